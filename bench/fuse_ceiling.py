"""The ceiling: a pyfuse3 filesystem that serves one file from a memory buffer with no work at all.

Mounted with the same options and read-ahead tuning as ``ihb mount``, it measures what the kernel,
libfuse and pyfuse3 allow, so ``fuse_bench.py`` can report ihb's reads as a fraction of it.

    python bench/fuse_ceiling.py MOUNTPOINT [--size BYTES]     (foreground; SIGTERM/Ctrl-C unmounts)
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import time
from typing import cast

import pyfuse3
import trio

from fusefs.mount import fuse_options, tune_read_ahead

FILE_INO = cast(pyfuse3.InodeT, 2)
NAME = b"data"
BUF = bytes(os.urandom(1024 * 1024)) * 16  # 16 MiB served over and over


class Ceiling(pyfuse3.Operations):
    def __init__(self, size: int, ready: trio.Event) -> None:
        super().__init__()
        self.size = size
        self.ready = ready
        self.buf = memoryview(BUF)
        self.now = time.time_ns()

    def init(self) -> None:
        self.ready.set()

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = cast(pyfuse3.InodeT, ino)
        e.st_mode = cast(pyfuse3.ModeT, (stat.S_IFDIR | 0o755) if ino == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o444))
        e.st_nlink = 2 if ino == pyfuse3.ROOT_INODE else 1
        e.st_size = 0 if ino == pyfuse3.ROOT_INODE else self.size
        e.st_blksize = 1024 * 1024
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self.now
        e.entry_timeout = e.attr_timeout = 300
        return e

    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INO):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INO)

    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        return cast(pyfuse3.FileHandleT, inode)

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, cast(pyfuse3.FileNameT, NAME), self._attr(FILE_INO), 1)

    async def open(self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # keep_cache off: every read of a run goes through FUSE, never the page cache of an earlier run.
        return pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, inode), keep_cache=False)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        size = max(0, min(size, self.size - off))
        o = off % len(self.buf)
        if o + size <= len(self.buf):
            return cast(bytes, self.buf[o : o + size])
        return bytes(self.buf[o:]) + bytes(self.buf[: size - (len(self.buf) - o)])


async def _serve(ops: Ceiling, mountpoint: str, ready: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as rx:
                async for _ in rx:
                    pyfuse3.terminate()
                    return

        async def tune() -> None:
            await ready.wait()
            tune_read_ahead(mountpoint, 8192)

        nursery.start_soon(signals)
        nursery.start_soon(tune)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mountpoint")
    ap.add_argument("--size", type=int, default=1 << 30)
    args = ap.parse_args()
    ready = trio.Event()
    ops = Ceiling(args.size, ready)
    pyfuse3.init(ops, args.mountpoint, fuse_options(allow_other=True, fsname="ihb-ceiling"))
    try:
        trio.run(_serve, ops, args.mountpoint, ready)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
