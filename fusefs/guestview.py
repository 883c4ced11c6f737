"""``<disk>.files/`` next to every ``<disk>.raw``: the files inside a VM image backup, browsable and
copyable with ordinary tools (maximum granularity, no helper VM, no loop device).

The disk is opened lazily, the first time ``<disk>.files/`` is listed, through repo.guestfs reading the
image via the mount's own chunk cache. One directory per volume (``p1-ext4``, ``p2-ntfs``, ``fs`` for
a partitionless disk); a volume that cannot be read holds ``NOT-READABLE.txt`` saying why (encrypted,
unknown filesystem, damaged), and so does ``<disk>.files/`` itself when the partition table is broken.
"""

from __future__ import annotations

import errno
import logging
import stat
import threading
from collections.abc import Iterable

from repo.errors import IhbError
from repo.guestfs import GuestFS, GuestStat, open_disk

from .vfs import (
    IMMUTABLE_TTL,
    Attr,
    ContentReader,
    DiskContext,
    Vfs,
    VirtualDir,
    VNode,
    _may_block,
    child_ino,
    register_disk_children,
)

log = logging.getLogger(__name__)


class _BytesReader(ContentReader):
    """Content that is not in chunks (a note, or a file inside a guest filesystem)."""

    def __init__(self, vfs: Vfs, size: int, read_at: object, blocking: bool = True) -> None:
        super().__init__(vfs.fetcher)
        self.size = size
        self._read_at = read_at
        self._blocking = blocking

    def read(self, off: int, size: int, out: bytearray | None = None) -> bytes:
        if self._blocking:
            # repo.guestfs turns any exception into its own errors, so the nowait probe must never
            # reach it: guest reads always run on a worker thread.
            _may_block()
        if off >= self.size or size <= 0:
            return b""
        return self._read_at(off, min(size, self.size - off))  # type: ignore[operator]

    def chunk_ids(self, off: int, end: int) -> list[bytes]:
        return []  # no chunk readahead: the disk reader below has its own

    def extents(self) -> list[tuple[int, int, bool]]:
        return [(0, self.size, True)] if self.size else []


class NoteNode(VNode):
    __slots__ = ("vfs", "text", "time_ns")

    def __init__(self, ino: int, vfs: Vfs, text: str, time_ns: int) -> None:
        super().__init__(ino)
        self.vfs, self.text, self.time_ns = vfs, text.encode(), time_ns

    def attr(self) -> Attr:
        t = self.time_ns
        return Attr(self.ino, stat.S_IFREG | 0o444, 1, self.vfs.uid, self.vfs.gid, len(self.text), 0,
                    (len(self.text) + 511) // 512, t, t, t, IMMUTABLE_TTL)

    def reader(self) -> ContentReader:
        data = self.text
        return _BytesReader(self.vfs, len(data), lambda off, n: data[off : off + n], blocking=False)


def _attr(ino: int, st: GuestStat) -> Attr:
    return Attr(ino, st.mode, max(st.nlink, 1), st.uid, st.gid, st.size, st.rdev, (st.size + 511) // 512,
                st.atime_ns, st.mtime_ns, st.ctime_ns, IMMUTABLE_TTL)


class GuestNode(VNode):
    """A non-directory inside the guest filesystem."""

    __slots__ = ("vfs", "fs", "path", "st")

    def __init__(self, ino: int, vfs: Vfs, fs: GuestFS, path: str, st: GuestStat) -> None:
        super().__init__(ino)
        self.vfs, self.fs, self.path, self.st = vfs, fs, path, st

    def attr(self) -> Attr:
        return _attr(self.ino, self.st)

    def readlink(self) -> bytes:
        _may_block()
        if not self.st.is_symlink:
            raise OSError(errno.EINVAL, "not a symbolic link")
        return (self.st.symlink_target or self.fs.readlink(self.path)).encode("utf-8", "surrogateescape")

    def xattrs(self) -> dict[bytes, bytes]:
        _may_block()
        try:
            return {k.encode(): v for k, v in self.fs.xattrs(self.path).items()}
        except (IhbError, OSError):
            return {}

    def reader(self) -> ContentReader:
        if not self.st.is_file:
            raise OSError(errno.EINVAL, "not a regular file")
        _may_block()
        f = self.fs.open(self.path)
        return _BytesReader(self.vfs, self.st.size, f.read_at)


class GuestDir(VirtualDir):
    """A directory inside the guest filesystem (its listing is fixed: built once)."""

    __slots__ = ("fs", "path", "st")
    ttl = IMMUTABLE_TTL
    live = False

    def __init__(self, ino: int, vfs: Vfs, fs: GuestFS, path: str, st: GuestStat) -> None:
        super().__init__(ino, vfs, st.mtime_ns)
        self.fs, self.path, self.st = fs, path, st

    def attr(self) -> Attr:
        a = _attr(self.ino, self.st)
        return a._replace(mode=stat.S_IFDIR | stat.S_IMODE(self.st.mode), nlink=max(a.nlink, 2))

    def xattrs(self) -> dict[bytes, bytes]:
        _may_block()
        try:
            return {k.encode(): v for k, v in self.fs.xattrs(self.path).items()}
        except (IhbError, OSError):
            return {}

    def build(self) -> dict[bytes, VNode]:
        _may_block()
        out: dict[bytes, VNode] = {}
        for name, st in self.fs.scandir(self.path):
            bname = name.encode("utf-8", "surrogateescape")
            if bname in (b".", b"..") or b"/" in bname:
                continue
            path = self.path.rstrip("/") + "/" + name
            ino = child_ino(self.ino, bname)
            out[bname] = GuestDir(ino, self.vfs, self.fs, path, st) if st.is_dir else GuestNode(ino, self.vfs, self.fs, path, st)
        return out


class NoteDir(VirtualDir):
    __slots__ = ("text",)
    ttl = IMMUTABLE_TTL
    live = False

    def __init__(self, ino: int, vfs: Vfs, text: str, time_ns: int) -> None:
        super().__init__(ino, vfs, time_ns)
        self.text = text

    def build(self) -> dict[bytes, VNode]:
        return {b"NOT-READABLE.txt": NoteNode(child_ino(self.ino, b"NOT-READABLE.txt"), self.vfs, self.text,
                                              self.time_ns)}


class DiskFilesDir(VirtualDir):
    """``<disk>.files/``: one directory per volume."""

    __slots__ = ("ctx", "_open_lock")
    ttl = IMMUTABLE_TTL
    live = False

    def __init__(self, ino: int, ctx: DiskContext) -> None:
        super().__init__(ino, ctx.vfs, ctx.snapshot.time_ns)
        self.ctx = ctx
        self._open_lock = threading.Lock()

    def build(self) -> dict[bytes, VNode]:
        _may_block()
        t = self.ctx.snapshot.time_ns
        try:
            disk = open_disk(self.ctx.reader())
        except (IhbError, OSError) as e:
            why = getattr(e, "reason", None) or str(e)
            return {b"NOT-READABLE.txt": NoteNode(child_ino(self.ino, b"NOT-READABLE.txt"), self.vfs,
                                                  f"disk {self.ctx.disk.name}: not readable: {why}\n", t)}
        out: dict[bytes, VNode] = {}
        for dv in disk.volumes:
            name = dv.name.encode()
            ino = child_ino(self.ino, name)
            if dv.fs is not None:
                try:
                    st = dv.fs.stat("/")
                    out[name] = GuestDir(ino, self.vfs, dv.fs, "/", st)
                    continue
                except (IhbError, OSError) as e:
                    log.warning("%s of %s: %s", dv.name, self.ctx.snapshot.short_id, e)
            out[name] = NoteDir(ino, self.vfs, dv.note(), t)
        if not out:
            out[b"NOT-READABLE.txt"] = NoteNode(child_ino(self.ino, b"NOT-READABLE.txt"), self.vfs,
                                                "no partitions or filesystems found on this disk\n", t)
        return out


def _provider(ctx: DiskContext) -> Iterable[tuple[bytes, VNode]]:
    name = ctx.disk.name.encode("utf-8", "surrogateescape").replace(b"/", b"_") + b".files"
    yield name, DiskFilesDir(ctx.child_ino(name), ctx)


register_disk_children(_provider)
