"""The ``ihb serve`` process: an exit stack of resources and a nursery of tasks (STYLE G10).

Start order: state store, repository (held open with a shared lock for the daemon's life), TLS
certificate, listeners; then one line each for the URL and the certificate fingerprint on stdout, so
an operator (or a test) can pin it, and READY=1 to systemd when run as a Type=notify unit (so "started"
means "accepting connections"). SIGTERM/SIGINT cancel the nursery and send STOPPING=1; resources close in
reverse; SIGUSR1 dumps all threads' stacks.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TextIO

import trio

from repo.repository import Repository

from .api import ApiServer
from .http import Limits, connection_handler
from .settings import ServerSettings
from .state import State
from .tls import cert_fingerprint, ensure_certificate, server_context

log = logging.getLogger(__name__)


def url_for(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"https://{shown}:{port}/"


async def serve(settings: ServerSettings, open_repo: Callable[[], Repository], out: TextIO = sys.stdout) -> None:
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    async with AsyncExitStack() as stack:
        state = State(settings.state_dir)
        stack.callback(state.close)
        repo = await trio.to_thread.run_sync(open_repo)
        stack.callback(repo.close)
        cert, key, generated = ensure_certificate(settings.state_dir, settings.tls_cert, settings.tls_key,
                                                  settings.hostnames)
        ssl_ctx = server_context(cert, key)
        api = ApiServer(repo, state, settings)
        stack.callback(api.ingest.close)  # queued catalog writes finish before the repository closes
        api.ingest.catch_up()
        limits = Limits(settings.header_timeout, settings.body_timeout, settings.idle_timeout, settings.send_timeout)
        handler = connection_handler(api.app, limits, settings.max_connections, ssl_ctx)
        listeners = await trio.open_tcp_listeners(settings.listen_port, host=settings.listen_host)
        for ln in listeners:
            stack.push_async_callback(ln.aclose)
        port = listeners[0].socket.getsockname()[1]
        fp = cert_fingerprint(cert)
        if generated:
            print(f"generated a self-signed certificate: {cert}", file=out)
        print(f"listening on {url_for(settings.listen_host, port)}", file=out)
        print(f"certificate fingerprint {fp}", file=out, flush=True)
        sd_notify(f"READY=1\nSTATUS=listening on {url_for(settings.listen_host, port)}")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, nursery.cancel_scope, name="signals")
                nursery.start_soon(trio.serve_listeners, handler, listeners, name="listeners")
        finally:  # a signal or an error: either way systemd sees the stop begin before resources close
            sd_notify("STOPPING=1")
        print("stopped", file=out, flush=True)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify units) the daemon's state (``READY=1``, ``STOPPING=1``, ``STATUS=...``,
    newline-separated): one datagram to $NOTIFY_SOCKET (a path, or ``@name`` in the abstract namespace);
    a no-op outside systemd, and a failure is only logged."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), addr)
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", addr, e)


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: shutting down", signum)
            scope.cancel()
            return
