"""Real notification receivers on loopback for the tests: an SMTP server (aiosmtpd) and a webhook
HTTP server (http.server in a thread) that can be told to fail."""

from __future__ import annotations

import contextlib
import email
import email.policy
import http.server
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Mailbox:
    port: int
    messages: list[EmailMessage] = field(default_factory=list)
    logins: list[tuple[bytes, bytes]] = field(default_factory=list)
    password: bytes = b"s3cret"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd API
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        msg["X-Test-Rcpt"] = ", ".join(envelope.rcpt_tos)
        self.messages.append(msg)  # type: ignore[arg-type]
        return "250 OK"

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            self.logins.append((auth_data.login, auth_data.password))
            return AuthResult(success=auth_data.password == self.password)
        return AuthResult(success=False)


@contextlib.contextmanager
def run_smtp(tls: ssl.SSLContext | None = None) -> Iterator[Mailbox]:
    """aiosmtpd on loopback; with ``tls`` it offers STARTTLS and requires it before mail and login."""
    box = Mailbox(free_port())
    ctl = Controller(box, hostname="127.0.0.1", port=box.port, authenticator=box, auth_require_tls=tls is not None,
                     tls_context=tls, require_starttls=tls is not None)
    ctl.start()
    try:
        yield box
    finally:
        ctl.stop()


@pytest.fixture
def smtp_server() -> Iterator[Mailbox]:
    with run_smtp() as box:
        yield box


def tls_pair(directory: Path) -> tuple[str, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1 (the appliance's own generator) and a server context."""
    from appliance.server.tls import ensure_certificate

    cert, key, _ = ensure_certificate(str(directory), None, None, [])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return cert, ctx


@dataclass
class Hooks:
    url: str
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    script: list[int] = field(default_factory=list)  # status codes to answer first, then 200 (404 for */gone)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(b) for _h, b in self.requests]


@pytest.fixture
def webhook_server() -> Iterator[Hooks]:
    with run_webhooks() as hooks:
        yield hooks


@contextlib.contextmanager
def run_webhooks(tls: ssl.SSLContext | None = None) -> Iterator[Hooks]:
    hooks = Hooks("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            hooks.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
            if self.path.endswith("/gone"):
                code = 404
            else:
                code = hooks.script.pop(0) if hooks.script else 200
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    hooks.url = f"{'https' if tls else 'http'}://127.0.0.1:{srv.server_address[1]}/hook"
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield hooks
    finally:
        srv.shutdown()
        srv.server_close()


def late_agent_job(state: Path, hours_ago: float, tenant: str = "beta") -> str:
    """A ``[[jobs]]`` entry for agent host laptop7 with a 1 h RPO, first seen ``hours_ago`` (so its RPO
    is already missed: nothing was ever pushed); writes ``seen.json`` into the state directory."""
    state.mkdir(parents=True, exist_ok=True)
    (state / "seen.json").write_text(json.dumps({"laptop": time.time_ns() - int(hours_ago * 3600 * 10**9)}))
    return f"""
[[jobs]]
name = "laptop"
kind = "agent"
tenant = "{tenant}"
host = "laptop7"
rpo = "1h"
"""


def web_job(src: Path, rpo: str = "") -> str:
    """A ``[[jobs]]`` entry backing up ``src`` as host web1 of tenant acme every minute."""
    return f"""
[[jobs]]
name = "web"
tenant = "acme"
host = "web1"
paths = ["{src}"]
schedule = "* * * * *"
""" + (f'rpo = "{rpo}"\n' if rpo else "")
