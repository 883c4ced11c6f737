"""The pyfuse3 adapter: translates requests to ``vfs.Vfs`` calls and errors to ``FUSEError``.

Each handler first tries its call in non-blocking mode on the event loop (cached pages and chunks
answer in microseconds); a call that needs repository I/O raises ``WouldBlock`` and is re-run on a
worker thread under one limiter, so decryption and decompression run on every core while trio keeps
serving. LMDB transactions open and close inside those synchronous calls and never span an await.

Errors (``_fuse_errors``, the only mapping): a damaged or missing chunk is EIO for the reads that need
it, logged once per chunk with its id and the restore point marked suspect; any other IhbError is EIO
logged once; an OSError keeps its errno. Anything else is a bug and ends the main loop.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pyfuse3
import trio

from repo.errors import IhbError

from .vfs import Attr, DamagedChunk, Vfs, WouldBlock, call_nowait

if TYPE_CHECKING:
    from pyfuse3 import FileHandleT, FileNameT, FlagT, InodeT, ReaddirToken, RequestContext, XAttrNameT

log = logging.getLogger(__name__)

T = TypeVar("T")
READDIR_BATCH = 128
REPLY_BUF = 1 << 20  # the largest read the kernel sends (max_read); larger ones get a buffer each
DEFAULT_THREADS = 16  # blocking calls in flight: chunk fetches wait on disk as well as on the CPU


def entry_attributes(a: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = cast("InodeT", a.ino)
    e.generation = 0
    e.entry_timeout = a.ttl
    e.attr_timeout = a.ttl
    e.st_mode = cast("pyfuse3.ModeT", a.mode)
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = a.rdev
    e.st_size = a.size
    e.st_blksize = 1024 * 1024
    e.st_blocks = a.blocks
    e.st_atime_ns = a.atime_ns
    e.st_mtime_ns = a.mtime_ns
    e.st_ctime_ns = a.ctime_ns
    return e


async def _wait_all(futures: list[Future[Any]]) -> None:
    """Wait for futures completed on other threads; each wakes the loop through run_sync_soon."""
    token = trio.lowlevel.current_trio_token()
    for fut in futures:
        if fut.done():
            continue
        done = trio.Event()

        def wake(_: Future[Any], done: trio.Event = done) -> None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        fut.add_done_callback(wake)
        await done.wait()


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: Vfs, *, threads: int = DEFAULT_THREADS,
                 on_init: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.vfs = vfs
        self.limiter = trio.CapacityLimiter(threads)
        self._on_init = on_init
        self._logged: set[str] = set()
        # Reads that span chunks are assembled here on the event loop instead of in a fresh buffer each:
        # pyfuse3 sends a read's reply before any other task runs, so one buffer serves them all.
        self._reply_buf = bytearray(REPLY_BUF)

    def init(self) -> None:
        """Called when the kernel's INIT arrives; must never raise."""
        try:
            if self._on_init is not None:
                self._on_init()
        except Exception:
            log.exception("mount ready callback failed")

    # --- plumbing ---------------------------------------------------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return call_nowait(fn, *args)
        except WouldBlock:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    @contextmanager
    def _fuse_errors(self, origin: str | None = None) -> Iterator[None]:
        try:
            yield
        except DamagedChunk as e:
            if self.vfs.mark_suspect(origin, e.chunk_id):
                where = f"restore point {origin[:12]}" if origin else "the mount"
                log.error("chunk %s is damaged or missing (%s); reads of that range fail with EIO and %s is "
                          "marked suspect; run `ihb check --read-data`", e.chunk_id.hex(), e, where)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except IhbError as e:  # other damage (a malformed record) or a repository problem: EIO, mount stays
            msg = str(e)
            if msg not in self._logged:
                self._logged.add(msg)
                log.error("%s; answering EIO", msg)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    # --- handlers ---------------------------------------------------------------------------------------
    async def lookup(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> pyfuse3.EntryAttributes:
        with self._fuse_errors(self.vfs.inode_origin(parent_inode)):
            return entry_attributes(await self._run(self.vfs.lookup, parent_inode, bytes(name)))

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for ino, n in inode_list:
            try:
                self.vfs.forget(ino, n)
            except Exception:  # forget() must never raise
                log.exception("forget(%d) failed", ino)

    async def getattr(self, inode: InodeT, ctx: RequestContext) -> pyfuse3.EntryAttributes:
        with self._fuse_errors(self.vfs.inode_origin(inode)):
            return entry_attributes(await self._run(self.vfs.getattr, inode))

    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        with self._fuse_errors():
            return cast("FileNameT", await self._run(self.vfs.readlink, inode))

    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        with self._fuse_errors():
            node = self.vfs.node(inode)
            if not await self._run(node.is_dir):
                raise OSError(errno.ENOTDIR, "not a directory")
        return cast("FileHandleT", inode)

    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        off = start_id
        with self._fuse_errors(self.vfs.inode_origin(fh)):
            while True:
                batch = await self._run(self.vfs.readdir, fh, off, READDIR_BATCH)
                taken = []
                try:
                    for nxt, name, attr, node in batch:
                        if not pyfuse3.readdir_reply(token, name, entry_attributes(attr), nxt):
                            return
                        taken.append(node)  # counted only once the kernel took it
                        off = nxt
                finally:
                    self.vfs.remember_all(taken)
                if len(batch) < READDIR_BATCH:
                    return

    async def releasedir(self, fh: FileHandleT) -> None:
        return None

    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        with self._fuse_errors(self.vfs.inode_origin(inode)):
            fh = await self._run(self.vfs.open, inode)
        # Restore points never change: the page cache may keep what it read across opens.
        return pyfuse3.FileInfo(fh=cast("FileHandleT", fh), keep_cache=True)

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        with self._fuse_errors(self.vfs.origin(fh)):
            h = self.vfs.handle(fh)
            h.after_read(off, size)  # start readahead before waiting for this range
            try:
                return cast(bytes, call_nowait(h.read, off, size, self._reply_buf))
            except WouldBlock:
                pass
            try:  # await the chunks' fetches on the loop: a worker thread parked on them costs two more wake-ups
                cids = call_nowait(h.reader.chunk_ids, off, off + size)
            except WouldBlock:
                cids = []
            await _wait_all(self.vfs.fetcher.pending(cids))
            try:
                data = call_nowait(h.read, off, size, self._reply_buf)
            except WouldBlock:  # a map page to load, a failed fetch to report, or content without chunks
                data = await trio.to_thread.run_sync(h.read, off, size, limiter=self.limiter)
        return cast(bytes, data)

    async def release(self, fh: FileHandleT) -> None:
        self.vfs.release(fh)

    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        with self._fuse_errors():
            return await self._run(self.vfs.getxattr, inode, bytes(name))

    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        with self._fuse_errors():
            return cast("Sequence[XAttrNameT]", await self._run(self.vfs.listxattr, inode))

    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        info = self.vfs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = info["bsize"]
        s.f_frsize = info["frsize"]
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = info["files"]
        s.f_ffree = s.f_favail = 0
        s.f_namemax = info["namemax"]
        return s
