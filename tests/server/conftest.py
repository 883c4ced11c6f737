"""Fixtures for the appliance tests: a real `ihb serve` process and real `ihb agent` processes.

Everything runs as separate processes over loopback TLS, as in production. Missing prerequisites
(PostgreSQL binaries, schemathesis) fail the test with the reason; nothing is skipped.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
IHB = [sys.executable, "-c", "from appliance.cli import main; main()"]


def require(path: str, why: str) -> str:
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: {why}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ihb(*args: str, check: bool = True, timeout: float = 180, env: dict[str, str] | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*IHB, *args], capture_output=True, text=True, timeout=timeout, env=env or os.environ.copy(),
                       cwd=cwd or str(ROOT))
    if check and p.returncode != 0:
        pytest.fail(f"ihb {' '.join(args)} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("IHB_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("IHB_TESTONLY_WEAK_KDF", "1")
    monkeypatch.setenv("IHB_TESTONLY_AGENT_BATCH", str(4 * 1024 * 1024))  # many batches from little data
    monkeypatch.setenv("IHB_PASSPHRASE", "appliance test passphrase")
    monkeypatch.setenv("IHB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("IHB_AGENT_CONFIG", str(tmp_path / "no-agent-config.toml"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(ROOT)
    (tmp_path / "no-agent-config.toml").write_text("")


class Appliance:
    """One appliance: a repository, a config, a state dir and (when started) a server process."""

    def __init__(self, base: Path, **server: Any) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.repo = base / "repo"
        self.state = base / "state"
        self.port = free_port()
        self.config = base / "config.toml"
        opts = {"listen": f"127.0.0.1:{self.port}", "state_dir": str(self.state), **server}
        lines = ["[repository]", f'path = "{self.repo}"', f'cache_dir = "{base / "server-cache"}"', "", "[server]"]
        for k, v in opts.items():
            lines.append(f"{k} = {json.dumps(v)}")
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"https://127.0.0.1:{self.port}/"
        self.fingerprint = ""
        self.log = base / "server.log"
        run_ihb("init", "--repo", str(self.repo), "--pack-size", str(4 * 1024 * 1024))

    def token(self, tenant: str | None = None, host: str | None = None, role: str = "agent",
              own_key: bool = False) -> Path:
        name = f"{role}-{tenant or 'all'}-{host or 'all'}.token"
        path = self.base / name
        args = ["token", "create", "--config", str(self.config), "--role", role, "-o", str(path)]
        if tenant:
            args += ["--tenant", tenant]
        if host:
            args += ["--host", host]
        if own_key:
            args.append("--own-key")
        run_ihb(*args)
        return path

    def start(self, timeout: float = 30) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - owned by the process until stop()
        self.proc = subprocess.Popen([*IHB, "serve", "--config", str(self.config)], stdout=out, stderr=out,
                                     cwd=str(ROOT))
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            fps = [ln.split()[-1] for ln in text.splitlines() if ln.startswith("certificate fingerprint ")]
            if fps:
                self.fingerprint = fps[-1]
                if self._listening():
                    return
            if self.proc.poll() is not None:
                pytest.fail(f"ihb serve exited {self.proc.returncode} at start:\n{text}")
            time.sleep(0.05)
        pytest.fail(f"ihb serve did not start within {timeout} s:\n{self.log.read_text(errors='replace')}")

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("ihb serve did not stop on SIGTERM within 15 s")
        self.proc = None
        assert rc == 0, f"ihb serve exited {rc} on SIGTERM:\n{self.log.read_text(errors='replace')}"

    def agent_args(self, token: Path) -> list[str]:
        return ["--server", self.url, "--token-file", str(token), "--fingerprint", self.fingerprint]

    def agent(self, token: Path, cmd: str, *rest: str, cache: Path | None = None, check: bool = True,
              timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """``ihb agent CMD ... --json``; ``cache`` plays the role of the agent host's own disk."""
        args = ["agent", cmd, *self.agent_args(token), "--json"]
        if cache is not None:
            args += ["--cache-dir", str(cache)]
        return run_ihb(*args, *rest, check=check, timeout=timeout)

    # --- raw API access for tests ----------------------------------------------------------------------
    def api(self, method: str, path: str, token: Path | str | None = None, body: Any = None,
            raw: bytes | None = None, ctype: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=30)
        headers = dict(headers or {})
        if token is not None:
            tok = token.read_text().strip() if isinstance(token, Path) else token
            headers["Authorization"] = f"Bearer {tok}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if ctype:
            headers["Content-Type"] = ctype
        try:
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            payload = r.read()
        finally:
            conn.close()
        if r.getheader("content-type", "").startswith("application/json"):
            return r.status, json.loads(payload)
        return r.status, payload


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    a = Appliance(tmp_path / "appliance")
    try:
        yield a
    finally:
        if a.proc is not None:
            a.proc.kill()
            a.proc.wait()


def write_tree(base: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return base


def tree_digest(base: Path) -> dict[str, str]:
    import hashlib

    out = {}
    for p in sorted(base.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(base))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
