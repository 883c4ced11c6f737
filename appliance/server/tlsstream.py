"""TLS over a trio socket stream, decrypting every record that has arrived in one step.

Why not ``trio.SSLStream``: it returns at most one TLS record (16 KiB) per ``receive_some``, so a
64 MiB upload costs ~4000 trips through the scheduler, h11 and the body loop, which measured as most
of the appliance's CPU per uploaded byte. Here one transport read of up to 256 KiB is decrypted into
one chunk. The HTTP layer uses a stream from one task at a time (request, then response), which is
all this class supports; handshake and shutdown follow the stdlib ``SSLObject`` protocol.
"""

from __future__ import annotations

import ssl

import trio

TRANSPORT_READ = 256 * 1024
RECORD_READ = 64 * 1024
SEND_PIECE = 256 * 1024


class TLSStream(trio.abc.Stream):
    def __init__(self, transport: trio.SocketStream, ctx: ssl.SSLContext) -> None:
        self.transport = transport
        self.socket = transport.socket
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self._eof = False

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await self.transport.send_all(data)

    async def _fill(self) -> bool:
        data = await self.transport.receive_some(TRANSPORT_READ)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def do_handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
                await self._flush()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise trio.BrokenResourceError("the client closed the connection during the TLS handshake") from None
            except ssl.SSLError as e:
                try:
                    await self._flush()  # the alert, if any
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                raise trio.BrokenResourceError(f"TLS handshake failed: {e}") from e

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._eof:
            await trio.lowlevel.checkpoint()
            return b""
        while True:
            parts: list[bytes] = []
            try:
                while True:
                    parts.append(self._obj.read(RECORD_READ))
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True
            except ssl.SSLError as e:
                raise trio.BrokenResourceError(f"TLS error: {e}") from e
            if self._out.pending:
                await self._flush()  # TLS 1.3 tickets, key updates
            data = b"".join(parts)
            if data or self._eof:
                if not data:
                    await trio.lowlevel.checkpoint()
                return data
            if not await self._fill():
                self._eof = True  # an EOF without close_notify: treat as end of stream (HTTP framing decides)
                await trio.lowlevel.checkpoint()
                return b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            for off in range(0, len(view), SEND_PIECE):
                self._obj.write(view[off : off + SEND_PIECE])
                await self._flush()
        except ssl.SSLError as e:
            raise trio.BrokenResourceError(f"TLS error: {e}") from e
        if not view:
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    async def aclose(self) -> None:
        try:
            with trio.move_on_after(1):
                try:
                    self._obj.unwrap()
                except (ssl.SSLWantReadError, ssl.SSLError, ValueError):
                    pass
                await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self.transport.aclose()
