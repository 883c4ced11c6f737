"""The agent's HTTPS client: certificate pinning, retries across outages, a bandwidth limit.

Synchronous on purpose: the agent's work is threads doing C work (FastCDC, BLAKE3, zstd, TLS), and
http.client over one connection per thread is the simplest thing that overlaps them. Every request
the agent makes is idempotent on the server, so a request that fails because the connection dropped
or the appliance restarted is simply retried until ``retry_for`` seconds of outage have passed.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

from appliance.server.tls import fingerprint_der, normalize_fingerprint
from appliance.units import parse_size
from repo.errors import InvalidArgument, TicketRefused

from .errors import AuthFailed, CertificateMismatch, ServerRejected, ServerUnreachable

log = logging.getLogger(__name__)

SEND_SLICE = 64 * 1024
API = "/api/v1"


class Parts:
    """A request body of many buffers (an upload's frame headers and blob bodies), sent through one
    reused buffer instead of joined first: a joined 32 MiB upload batch was a fresh allocation each
    time, whose first touch costs a page fault per 4 KiB (~2.9 us each here): ~90,000 faults, 0.25 s of
    CPU, for 512 MiB uploaded. Iterable again for each attempt; every yielded view is sent before the
    next is made (http.client sends synchronously)."""

    def __init__(self, parts: list[bytes], gather: int = 1024 * 1024) -> None:
        self.parts = parts
        self.size = sum(len(p) for p in parts)
        self.gather = gather

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes | memoryview]:
        buf = bytearray(self.gather)
        view = memoryview(buf)
        n = 0
        for p in self.parts:
            if n and n + len(p) > self.gather:
                yield view[:n]
                n = 0
            if len(p) >= self.gather:
                yield p
                continue
            buf[n : n + len(p)] = p
            n += len(p)
        if n:
            yield view[:n]


Body = bytes | Parts


class Transient(Exception):
    """A failure worth retrying: no connection, a dropped one, or a 502/503/504."""


class RateLimiter:
    """A token bucket over bytes sent, shared by every connection of the agent."""

    def __init__(self, bytes_per_second: float, burst_seconds: float = 0.25) -> None:
        self.rate = float(bytes_per_second)
        self.burst = burst_seconds
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now - self.burst) + n / self.rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)


def parse_rate(value: str) -> float:
    """``500K``, ``10M``, ``1.5G`` (bytes per second, binary multiples) or a plain number."""
    v = value.strip()
    rate = parse_size(v[:-2] if v.lower().endswith("/s") else v, "bandwidth limit")
    if rate < 1024:
        raise InvalidArgument(f"bandwidth limit {value!r} is below 1 KiB/s")
    return float(rate)


class _PinnedConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, pin: str | None, timeout: float) -> None:
        super().__init__(host, port, context=ctx, timeout=timeout)
        self.pin = pin

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.pin is not None:
            der = self.sock.getpeercert(binary_form=True)
            got = fingerprint_der(der or b"")
            if got != self.pin:
                self.close()
                raise CertificateMismatch(
                    f"the appliance at {self.host}:{self.port} presented certificate {got}, not the pinned "
                    f"{self.pin}; if the appliance's certificate was replaced, update --fingerprint")


class Client:
    def __init__(self, url: str, token: str, *, fingerprint: str | None = None, ca_file: str | None = None,
                 timeout: float = 300.0, retry_for: float = 300.0, bwlimit: float | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise InvalidArgument(f"--server {url!r}: give an https:// URL of the appliance")
        if fingerprint and ca_file:
            raise InvalidArgument("give --fingerprint or --ca-file, not both")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 443
        self.base = parts.path.rstrip("/")
        self.token = token.strip()
        self.timeout = timeout
        self.retry_for = retry_for
        self.limiter = RateLimiter(bwlimit) if bwlimit else None
        if ca_file:
            self.ctx = ssl.create_default_context(cafile=ca_file)
            self.pin = None
        elif fingerprint:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.ctx.check_hostname = False
            self.ctx.verify_mode = ssl.CERT_NONE  # the fingerprint check in connect() replaces the CA check
            self.pin = normalize_fingerprint(fingerprint)
        else:
            self.ctx = ssl.create_default_context()
            self.pin = None
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._local = threading.local()
        self._outage_since: float | None = None
        self._olock = threading.Lock()
        self.bytes_sent = 0
        self.headers: dict[str, str] = {}  # sent with every request (X-Ihb-Ticket for a restore)

    # --- connections -----------------------------------------------------------------------------------
    def _conn(self) -> _PinnedConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = _PinnedConnection(self.host, self.port, self.ctx, self.pin, self.timeout)
        return c

    def _drop(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    def close(self) -> None:
        self._drop()

    def _body_iter(self, body: Body) -> Iterator[bytes | memoryview]:
        limiter = self.limiter
        assert limiter is not None
        for buf in (body,) if isinstance(body, bytes) else body:
            view = memoryview(buf)
            for i in range(0, len(view), SEND_SLICE):
                piece = view[i : i + SEND_SLICE]
                limiter.take(len(piece))
                yield piece

    # --- requests --------------------------------------------------------------------------------------
    def _once(self, method: str, path: str, body: Body | None, ctype: str | None) -> tuple[int, bytes, str]:
        conn = self._conn()
        headers = {**self.headers, "Authorization": f"Bearer {self.token}", "User-Agent": "ihb-agent/1"}
        if body is not None:
            headers["Content-Type"] = ctype or "application/octet-stream"
            headers["Content-Length"] = str(len(body))
        try:
            if body is not None and self.limiter is not None:
                conn.request(method, self.base + path, body=self._body_iter(body), headers=headers)
            else:
                conn.request(method, self.base + path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except CertificateMismatch:
            self._drop()
            raise
        except ssl.SSLCertVerificationError as e:
            self._drop()
            raise CertificateMismatch(f"the appliance's certificate is not trusted: {e.verify_message}") from None
        except (OSError, http.client.HTTPException) as e:
            self._drop()
            raise Transient(f"{type(e).__name__}: {e}") from None
        if body is not None:
            self.bytes_sent += len(body)
        if resp.getheader("connection", "").lower() == "close":
            self._drop()
        return resp.status, data, resp.getheader("content-type", "")

    def request(self, method: str, path: str, body: Body | None = None, ctype: str | None = None,
                query: dict[str, str] | None = None, retry: bool = True) -> bytes:
        """Returns the body of a 2xx answer; raises the matching AgentError otherwise. With ``retry``,
        transient failures are retried until the outage lasts ``retry_for`` seconds."""
        if query:
            path = f"{path}?{urlencode(query)}"
        delay = 0.2
        while True:
            try:
                status, data, rtype = self._once(method, path, body, ctype)
                if status in (502, 503, 504):
                    raise Transient(f"HTTP {status}")
            except Transient as e:
                self._note_outage(str(e))
                if not retry:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._note_ok()
            if 200 <= status < 300:
                return data
            raise self._error(status, data, rtype, method, path)

    def _note_outage(self, why: str) -> None:
        with self._olock:
            now = time.monotonic()
            if self._outage_since is None:
                self._outage_since = now
                log.warning("lost the appliance at %s (%s); retrying for up to %.0f s", self.url, why, self.retry_for)
            elif now - self._outage_since > self.retry_for:
                raise ServerUnreachable(f"the appliance at {self.url} has been unreachable for "
                                        f"{now - self._outage_since:.0f} s ({why}); run the backup again later: "
                                        "it resumes where it stopped")

    def _note_ok(self) -> None:
        with self._olock:
            if self._outage_since is not None:
                log.warning("the appliance is back after %.1f s", time.monotonic() - self._outage_since)
            self._outage_since = None

    @staticmethod
    def _error(status: int, data: bytes, rtype: str, method: str, path: str) -> Exception:
        msg, extra = f"HTTP {status}", {}
        if "json" in rtype:
            try:
                err = json.loads(data)["error"]
                msg, extra = err["message"], err
            except (ValueError, KeyError, TypeError):
                pass
        if status == 401:
            return AuthFailed(f"the appliance refused the token: {msg}")
        if status == 403 and extra.get("code") in ("ticket_required", "ticket_refused"):
            return TicketRefused(msg)  # the tenant requires authorized restores (docs/restore.md)
        if status == 403:
            return AuthFailed(f"this token may not do that: {msg}")
        e = ServerRejected(f"the appliance answered {status} to {method} {path.split('?')[0]}: {msg}")
        e.status = status  # type: ignore[attr-defined]
        e.detail = extra  # type: ignore[attr-defined]
        return e

    def json(self, method: str, path: str, obj: Any = None, query: dict[str, str] | None = None,
             retry: bool = True) -> Any:
        body = None if obj is None else json.dumps(obj).encode()
        data = self.request(method, API + path, body, "application/json" if body is not None else None, query, retry)
        try:
            return json.loads(data)
        except ValueError:
            raise ServerRejected(f"the appliance answered {method} {path} with something that is not JSON") from None
