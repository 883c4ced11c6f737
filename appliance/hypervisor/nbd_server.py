"""Serve a disk of a restore point over NBD, read-only underneath, with a copy-on-write overlay.

For hypervisors that cannot open a file on the appliance (no FUSE view), and for instant recovery
over the network: ``qemu-system-x86_64 -drive file=nbd://APPLIANCE:10809/vda`` boots straight from
the backup. Writes land in a sparse overlay file (4 KiB granularity, its map persisted beside it on
every flush), never in the repository. A plain thread per connection: reads go through
repo.image.ImageReader, whose cache and C work are thread-safe.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import struct
import threading
from collections.abc import Callable

from repo.errors import IntegrityError

log = logging.getLogger(__name__)

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 6
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES = 1, 2, 4, 32, 64
TF_CAN_MULTI_CONN = 256
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
EIO, EPERM, EINVAL, ENOSPC = 5, 1, 22, 28
MAX_REQUEST = 32 << 20
BLOCK = 4096

ReadFn = Callable[[int, int], bytes]


class Overlay:
    """Copy-on-write overlay: a sparse file the size of the disk plus a map of written 4 KiB blocks."""

    def __init__(self, path: str, size: int) -> None:
        self.path, self.size = path, size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, size)
        nblocks = (size + BLOCK - 1) // BLOCK
        self.map = bytearray((nblocks + 7) // 8)
        try:
            with open(path + ".map", "rb") as f:
                saved = f.read()
            if len(saved) == len(self.map):
                self.map[:] = saved
        except FileNotFoundError:
            pass
        self.lock = threading.Lock()

    def has(self, blk: int) -> bool:
        return bool(self.map[blk >> 3] & (1 << (blk & 7)))

    def mark(self, blk: int) -> None:
        self.map[blk >> 3] |= 1 << (blk & 7)

    def flush(self) -> None:
        with self.lock:
            os.fsync(self.fd)
            tmp = self.path + ".map.tmp"
            with open(tmp, "wb") as f:
                f.write(self.map)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path + ".map")


class DiskExport:
    def __init__(self, name: str, size: int, read: ReadFn, overlay: Overlay | None) -> None:
        self.name, self.size, self.read_base, self.overlay = name, size, read, overlay

    def read(self, off: int, ln: int) -> bytes:
        ov = self.overlay
        if ov is None:
            return self.read_base(off, ln)
        first, last = off // BLOCK, (off + ln - 1) // BLOCK
        if not any(ov.has(b) for b in range(first, last + 1)):
            return self.read_base(off, ln)
        out = bytearray(self.read_base(off, ln))
        for b in range(first, last + 1):
            if ov.has(b):
                lo, hi = max(off, b * BLOCK), min(off + ln, (b + 1) * BLOCK)
                out[lo - off : hi - off] = os.pread(ov.fd, hi - lo, lo)
        return bytes(out)

    def write(self, off: int, data: bytes) -> None:
        ov = self.overlay
        assert ov is not None
        with ov.lock:
            first, last = off // BLOCK, (off + len(data) - 1) // BLOCK
            for b in (first, last):  # partial edge blocks are completed from the base first
                if not ov.has(b):
                    bstart = b * BLOCK
                    blen = min(BLOCK, self.size - bstart)
                    if off > bstart or off + len(data) < bstart + blen:
                        os.pwrite(ov.fd, self.read_base(bstart, blen), bstart)
            os.pwrite(ov.fd, data, off)
            for b in range(first, last + 1):
                ov.mark(b)


class _Handler(socketserver.BaseRequestHandler):
    server: NBDServer

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.request.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("client went away")
            buf += chunk
        return bytes(buf)

    def _opt_reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.request.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

    def _tflags(self, exp: DiskExport) -> int:
        f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN
        if exp.overlay is None:
            f |= TF_READ_ONLY
        else:
            f |= TF_SEND_WRITE_ZEROES | TF_SEND_TRIM
        return f

    def handle(self) -> None:
        sock = self.request
        try:
            sock.sendall(NBDMAGIC + struct.pack(">QH", IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
            (cflags,) = struct.unpack(">I", self._recv(4))
            exp = self._negotiate(cflags)
            if exp is not None:
                self._transmit(exp)
        except (ConnectionError, OSError):
            pass

    def _negotiate(self, cflags: int) -> DiskExport | None:
        while True:
            magic, opt, length = struct.unpack(">QII", self._recv(16))
            if magic != IHAVEOPT or length > 64 * 1024:
                return None
            data = self._recv(length) if length else b""
            if opt == OPT_EXPORT_NAME:
                exp = self.server.exports.get(data.decode(errors="replace")) or self.server.default_export()
                if exp is None:
                    return None
                tail = b"" if cflags & FLAG_NO_ZEROES else bytes(124)
                self.request.sendall(struct.pack(">QH", exp.size, self._tflags(exp)) + tail)
                return exp
            if opt in (OPT_GO, OPT_INFO):
                (nlen,) = struct.unpack(">I", data[:4])
                name = data[4 : 4 + nlen].decode(errors="replace")
                exp = self.server.exports.get(name) or (self.server.default_export() if not name else None)
                if exp is None:
                    self._opt_reply(opt, REP_ERR_UNKNOWN, b"no such export")
                    continue
                self._opt_reply(opt, REP_INFO, struct.pack(">HQH", 0, exp.size, self._tflags(exp)))
                self._opt_reply(opt, REP_ACK)
                if opt == OPT_GO:
                    return exp
                continue
            if opt == OPT_LIST:
                for name in self.server.exports:
                    n = name.encode()
                    self._opt_reply(opt, REP_SERVER, struct.pack(">I", len(n)) + n)
                self._opt_reply(opt, REP_ACK)
                continue
            if opt == OPT_ABORT:
                self._opt_reply(opt, REP_ACK)
                return None
            self._opt_reply(opt, REP_ERR_UNSUP)

    def _reply(self, cookie: int, err: int, data: bytes = b"") -> None:
        self.request.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, err, cookie) + data)

    def _transmit(self, exp: DiskExport) -> None:
        while True:
            magic, _flags, cmd, cookie, off, ln = struct.unpack(">IHHQQI", self._recv(28))
            if magic != REQUEST_MAGIC:
                return
            if cmd == CMD_DISC:
                return
            payload = self._recv(ln) if cmd == CMD_WRITE else b""
            if cmd in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and (off + ln > exp.size or ln > MAX_REQUEST):
                self._reply(cookie, EINVAL)
                continue
            try:
                if cmd == CMD_READ:
                    self._reply(cookie, 0, exp.read(off, ln))
                elif cmd in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM):
                    if exp.overlay is None:
                        self._reply(cookie, EPERM)
                        continue
                    exp.write(off, payload if cmd == CMD_WRITE else bytes(ln))
                    self._reply(cookie, 0)
                elif cmd == CMD_FLUSH:
                    if exp.overlay is not None:
                        exp.overlay.flush()
                    self._reply(cookie, 0)
                else:
                    self._reply(cookie, EINVAL)
            except IntegrityError as e:
                log.error("NBD read of %s at %d failed: %s", exp.name, off, e)
                self._reply(cookie, EIO)
            except OSError as e:
                self._reply(cookie, ENOSPC if e.errno == 28 else EIO)


class NBDServer(socketserver.ThreadingMixIn, socketserver.BaseServer):
    daemon_threads = True

    def __init__(self, exports: dict[str, DiskExport], *, unix: str | None = None, host: str = "127.0.0.1",
                 port: int = 10809) -> None:
        self.exports = exports
        if unix:
            self.address_family = socket.AF_UNIX
            addr: object = unix
            if os.path.exists(unix):
                os.unlink(unix)
        else:
            self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            addr = (host, port)
        socketserver.BaseServer.__init__(self, addr, _Handler)  # type: ignore[arg-type]
        self.socket = socket.socket(self.address_family, socket.SOCK_STREAM)
        if not unix:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(addr)  # type: ignore[arg-type]
        self.server_address = self.socket.getsockname()
        self.socket.listen(16)

    def default_export(self) -> DiskExport | None:
        return next(iter(self.exports.values())) if len(self.exports) == 1 else None

    def fileno(self) -> int:
        return self.socket.fileno()

    def get_request(self) -> tuple[socket.socket, object]:
        return self.socket.accept()

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        try:
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        request.close()

    def server_close(self) -> None:
        self.socket.close()
