"""A small HTTP/1.1 server: h11's state machine over trio streams, with limits and deadlines.

Why not a framework: the appliance needs three guarantees from its HTTP layer and nothing more —
every request is bounded in size, every read has a deadline, and a malformed request gets a 4xx with
one line of JSON rather than a traceback or a hung socket. h11 does no I/O of its own, so trio owns
every await and cancellation works everywhere. Routing and authentication live in ``app``.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

from .tlsstream import TLSStream

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
RECV_SIZE = 256 * 1024
REUSE_BODY = 1 << 20  # bodies this large are read into a spare buffer, returned after the response
SPARE_BODIES = 4  # spare upload buffers kept: bounded memory however many agents stay connected
_SPARE_BODIES: list[bytearray] = []  # touched only on the event loop
SERVER_NAME = "ihb-appliance"


class HTTPError(Exception):
    """Raised by handlers (and the parser) to answer with a 4xx and a one-line JSON message."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    remote: str
    body: bytes | memoryview = b""  # a view when read into place (Content-Length), valid until the response
    path_params: dict[str, str] = field(default_factory=dict)

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    def json(self) -> Any:
        ctype = self.header("content-type").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HTTPError(415, "send the body as Content-Type: application/json")
        try:
            return json.loads(bytes(self.body))
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not valid JSON: {e}") from None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def _safe_json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n")


def error_response(status: int, message: str, **extra: Any) -> Response:
    """The one error shape of the API: ``{"error": {"status": 404, "message": "..."}}`` on one line."""
    err: dict[str, Any] = {"status": status, "message": " ".join(message.split())}
    err.update(_safe_json(extra))
    return json_response({"error": err}, status)


class Application(Protocol):
    def body_limit(self, request: Request) -> int:
        """Raise HTTPError (404, 405, 401 ...) before the body is read, or say how much may come."""
        ...

    async def handle(self, request: Request) -> Response: ...


@dataclass
class Limits:
    header_timeout: float = 15.0
    body_timeout: float = 60.0
    idle_timeout: float = 120.0
    send_timeout: float = 120.0


class _Closed(Exception):
    """The peer went away or broke the protocol beyond answering."""


class HttpConnection:
    """Serves one TCP/TLS stream: requests in sequence (keep-alive), one response each."""

    def __init__(self, stream: trio.abc.Stream, app: Application, limits: Limits, remote: str) -> None:
        self.stream = stream
        self.app = app
        self.limits = limits
        self.remote = remote
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self._lent: bytearray | None = None  # the spare upload buffer this request's body is in

    async def _next_event(self, patience: float) -> Any:
        while True:
            ev = self.conn.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            with trio.move_on_after(patience) as scope:
                data = await self.stream.receive_some(RECV_SIZE)
            if scope.cancelled_caught:
                raise trio.TooSlowError
            self.conn.receive_data(data)

    async def _send(self, *events: Any) -> None:
        out = b"".join(self.conn.send(e) or b"" for e in events)
        with trio.move_on_after(self.limits.send_timeout) as scope:
            await self.stream.send_all(out)
        if scope.cancelled_caught:
            raise _Closed("send timed out")

    async def respond(self, resp: Response, close: bool = False) -> None:
        headers = [("server", SERVER_NAME), ("content-type", resp.content_type),
                   ("content-length", str(len(resp.body))), ("cache-control", "no-store"), *resp.headers]
        if close:
            headers.append(("connection", "close"))
        await self._send(h11.Response(status_code=resp.status, headers=headers),
                         h11.Data(data=resp.body), h11.EndOfMessage())

    async def _fail(self, status: int, message: str, **extra: Any) -> None:
        """Answer a request we cannot continue with, then close: the unread body makes keep-alive unsafe."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                await self.respond(error_response(status, message, **extra), close=True)
            except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
                pass

    async def serve(self) -> None:
        first = True
        while True:
            try:
                ev = await self._next_event(self.limits.header_timeout if first else self.limits.idle_timeout)
            except trio.TooSlowError:
                if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
                    return  # an idle keep-alive connection: close quietly
                await self._fail(408, "the request did not arrive in time")
                return
            except h11.RemoteProtocolError as e:
                await self._fail(e.error_status_hint if 400 <= e.error_status_hint < 500 else 400,
                                 f"malformed HTTP request: {e}")
                return
            first = False
            if isinstance(ev, h11.ConnectionClosed):
                return
            if not isinstance(ev, h11.Request):
                await self._fail(400, "expected an HTTP request")
                return
            keep = await self._one(ev)
            if not keep or self.conn.our_state is h11.MUST_CLOSE:
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    def _request_from(self, ev: h11.Request) -> Request:
        # h11 bounds only a head still incomplete; one that arrived whole is measured here.
        if len(ev.target) + sum(len(k) + len(v) + 4 for k, v in ev.headers) > MAX_HEADER_BYTES:
            raise HTTPError(431, f"the request head exceeds {MAX_HEADER_BYTES} bytes")
        try:
            target = ev.target.decode("ascii")
            method = ev.method.decode("ascii")
            headers: dict[str, str] = {}
            for k, v in ev.headers:
                headers[k.decode("ascii").lower()] = v.decode("latin-1")
        except UnicodeDecodeError:
            raise HTTPError(400, "the request line or headers are not ASCII") from None
        if not target.startswith("/"):
            raise HTTPError(400, "the request target must be an absolute path")
        parts = urlsplit(target)
        path = unquote(parts.path, errors="strict") if "%" in parts.path else parts.path
        query: dict[str, str] = {}
        for k, v in parse_qsl(parts.query, keep_blank_values=True):
            query[k] = v
        return Request(method=method, path=path, query=query, headers=headers, remote=self.remote)

    async def _read_body(self, limit: int, declared: int | None) -> bytes | memoryview:
        if declared is not None and declared > limit:
            raise HTTPError(413, f"the body is {declared} bytes; this endpoint accepts at most {limit}")
        if declared is not None:  # h11 enforces Content-Length; fill a buffer of that size in place
            if declared >= REUSE_BODY:
                # Uploads (up to 36 MiB each) borrow a spare buffer: a fresh one is zeroed and page-faulted
                # in every time. It goes back once the response is sent; a handler keeps no view of its
                # body after answering (its worker thread has finished by then).
                spare = _SPARE_BODIES.pop() if _SPARE_BODIES else bytearray()
                self._lent = spare if len(spare) >= declared else bytearray(declared)
                buf = memoryview(self._lent)[:declared]
            else:
                buf = memoryview(bytearray(declared))
            pos = 0
            while True:
                ev = await self._next_event(self.limits.body_timeout)
                if isinstance(ev, h11.Data):
                    buf[pos : pos + len(ev.data)] = ev.data
                    pos += len(ev.data)
                elif isinstance(ev, h11.EndOfMessage):
                    return buf if pos == declared else buf[:pos]
                else:
                    raise HTTPError(400, "the connection closed in the middle of the body")
        chunks: list[bytes] = []  # chunked transfer encoding
        size = 0
        while True:
            ev = await self._next_event(self.limits.body_timeout)
            if isinstance(ev, h11.Data):
                chunks.append(ev.data)
                size += len(ev.data)
                if size > limit:
                    raise HTTPError(413, f"the body exceeds {limit} bytes, the limit of this endpoint")
            elif isinstance(ev, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise HTTPError(400, "the connection closed in the middle of the body")

    async def _one(self, ev: h11.Request) -> bool:
        """Serve one request; return whether the connection may stay open."""
        try:
            return await self._serve_one(ev)
        finally:
            if self._lent is not None and len(_SPARE_BODIES) < SPARE_BODIES:
                _SPARE_BODIES.append(self._lent)
            self._lent = None

    async def _serve_one(self, ev: h11.Request) -> bool:
        try:
            req = self._request_from(ev)
            limit = self.app.body_limit(req)
            cl = req.header("content-length")
            declared = None
            if cl:
                try:
                    declared = int(cl)
                except ValueError:
                    raise HTTPError(400, "Content-Length is not a number") from None
            req.body = await self._read_body(limit, declared)
        except HTTPError as e:
            await self._fail(e.status, e.message, **e.extra)
            return False
        except trio.TooSlowError:
            await self._fail(408, "the request body did not arrive in time")
            return False
        except h11.RemoteProtocolError as e:
            await self._fail(400, f"malformed HTTP request: {e}")
            return False
        except ValueError as e:  # bad percent-encoding and the like
            await self._fail(400, f"malformed request target: {e}")
            return False
        try:
            resp = await self.app.handle(req)
        except HTTPError as e:
            resp = error_response(e.status, e.message, **e.extra)
        await self.respond(resp)
        return True


def _peer(stream: trio.abc.Stream) -> str:
    s: Any = stream
    for _ in range(3):
        sock = getattr(s, "socket", None)
        if sock is not None:
            try:
                host, port = sock.getpeername()[:2]
                return f"{host}:{port}"
            except OSError:
                return "?"
        s = getattr(s, "transport_stream", None)
        if s is None:
            break
    return "?"


def connection_handler(app: Application, limits: Limits, max_connections: int,
                       ssl_context: ssl.SSLContext | None = None) -> Callable[[trio.abc.Stream], Awaitable[None]]:
    """The per-stream task given to ``trio.serve_listeners``: TLS handshake (within the header
    deadline), then HTTP; never lets an exception escape."""
    slots = trio.CapacityLimiter(max_connections if max_connections > 0 else math.inf)

    async def handler(raw: trio.abc.Stream) -> None:
        async with slots:
            remote = _peer(raw)
            stream: trio.abc.Stream = raw
            try:
                if ssl_context is not None:
                    assert isinstance(raw, trio.SocketStream)
                    stream = TLSStream(raw, ssl_context)
                    with trio.move_on_after(limits.header_timeout) as hs:
                        await stream.do_handshake()
                    if hs.cancelled_caught:
                        return
                await HttpConnection(stream, app, limits, remote).serve()
            except (trio.BrokenResourceError, trio.ClosedResourceError, _Closed, h11.LocalProtocolError):
                pass
            except Exception:
                log.exception("connection from %s failed", remote)
            finally:
                with trio.move_on_after(2) as cs:
                    cs.shield = True
                    try:
                        await stream.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

    return handler
