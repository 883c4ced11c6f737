"""Random-access byte sources: the only way guestfs touches a disk image.

Why this module exists: in production a VM disk is not a file but a chunked object in the
deduplicated repository, readable only by offset. Everything in :mod:`repo.guestfs` is written
against the tiny :class:`ByteSource` protocol so it works the same on a repository-backed disk,
on a plain image file (tests, ``ihb restore-file`` on a local image) and on a slice of either
(a partition, a logical volume).

dissect, which parses the file systems, wants a seekable file object instead and issues many
tiny reads (a 2-byte FAT entry, a 256-byte inode). :class:`SourceReader` bridges the two with a
small bounded block cache, so metadata walks do not turn into thousands of repository reads.

Thread-safety contract: :meth:`ByteSource.read_at` must be safe to call from several threads at
once (``os.pread`` is; a repository reader must be). :class:`SourceReader` carries a file
position and is therefore *not* shareable; guestfs confines each one behind a lock.
"""

from __future__ import annotations

import bisect
import errno
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "ByteSource",
    "FileByteSource",
    "MappedSource",
    "Run",
    "SliceSource",
    "SourceReader",
    "read_exact",
]

#: Granularity of the :class:`SourceReader` cache. 64 KiB turns the typical burst of small
#: metadata reads (a directory block, an inode, a bitmap) into one source read.
CACHE_BLOCK_SIZE = 64 * 1024
#: Number of cached blocks per reader (4 MiB). Large file data never goes through this cache:
#: :mod:`repo.guestfs.filesystems` reads file extents straight from the source.
CACHE_BLOCKS = 64


@runtime_checkable
class ByteSource(Protocol):
    """Anything with a size that can be read at an offset.

    ``read_at`` returns ``min(size, self.size - offset)`` bytes (fewer only at the end) and never
    changes shared state, so callers may use one source from several threads.
    """

    size: int

    def read_at(self, offset: int, size: int) -> bytes:
        """Return the bytes at ``[offset, offset + size)``, clipped to the end of the source."""
        ...


def read_exact(source: ByteSource, offset: int, size: int) -> bytes:
    """Read exactly ``size`` bytes or raise ``OSError(EIO)``.

    Parsers use this for structures that must be complete: a truncated image must surface as
    an I/O error, not as a silently short (and mis-parsed) buffer.
    """
    data = source.read_at(offset, size)
    if len(data) != size:
        raise OSError(errno.EIO, f"short read: wanted {size} bytes at offset {offset}, got {len(data)}")
    return data


class FileByteSource:
    """A :class:`ByteSource` over a local file or block device, read with ``os.pread``.

    ``pread`` has no file position, so one instance serves any number of threads.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # lseek(SEEK_END) works for regular files and block devices alike.
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self._fd)
            raise

    def read_at(self, offset: int, size: int) -> bytes:
        """Read with ``os.pread``, looping over short reads; clipped at the end of the file."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        size = max(0, min(size, self.size - offset))
        parts: list[bytes] = []
        while size > 0:
            chunk = os.pread(self._fd, size, offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Close the file descriptor; further reads fail with ``EBADF``."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileByteSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FileByteSource({self.path!r}, size={self.size})"


class SliceSource:
    """A window ``[offset, offset + size)`` of another source: a partition of a disk.

    Slices of slices collapse to one level so a read never walks a chain of wrappers.
    """

    def __init__(self, parent: ByteSource, offset: int, size: int) -> None:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        if isinstance(parent, SliceSource):
            offset += parent.offset
            parent = parent.parent
        self.parent: ByteSource = parent
        self.offset = offset
        self.size = size

    def read_at(self, offset: int, size: int) -> bytes:
        """Read relative to the start of the slice, clipped to its end."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        return self.parent.read_at(self.offset + offset, size)

    def to_parent(self, offset: int, size: int) -> list[tuple[int, int]]:
        """Map a byte range of the slice to ``(parent_offset, length)`` ranges."""
        size = max(0, min(size, self.size - offset))
        return [(self.offset + offset, size)] if size else []

    def __repr__(self) -> str:
        return f"SliceSource(offset={self.offset}, size={self.size})"


@dataclass(frozen=True, slots=True)
class Run:
    """``length`` bytes at ``offset`` in a mapped source come from ``parent_offset`` in the parent.

    ``parent_offset`` is ``None`` for a hole that reads as zeroes (an LVM ``zero``/``error`` segment).
    """

    offset: int
    length: int
    parent_offset: int | None


class MappedSource:
    """A source assembled from runs of a parent source: a linear LVM logical volume.

    Runs must be sorted, non-overlapping and cover ``[0, size)`` without gaps.
    """

    def __init__(self, parent: ByteSource, runs: Sequence[Run]) -> None:
        pos = 0
        for run in runs:
            if run.offset != pos or run.length <= 0:
                raise ValueError("runs must be contiguous, sorted and non-empty")
            pos += run.length
        self.parent = parent
        self.runs = tuple(runs)
        self._starts = [r.offset for r in self.runs]
        self.size = pos

    def to_parent(self, offset: int, size: int) -> list[tuple[int, int]]:
        """Map a byte range to ``(parent_offset, length)`` ranges, skipping holes."""
        out: list[tuple[int, int]] = []
        end = min(offset + size, self.size)
        idx = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while offset < end and idx < len(self.runs):
            run = self.runs[idx]
            take = min(end, run.offset + run.length) - offset
            if take > 0 and run.parent_offset is not None:
                out.append((run.parent_offset + offset - run.offset, take))
            offset += max(take, 0)
            idx += 1
        return out

    def read_at(self, offset: int, size: int) -> bytes:
        """Read across runs; holes read as zeroes."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(offset + size, self.size)
        parts: list[bytes] = []
        idx = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while offset < end:
            run = self.runs[idx]
            take = min(end, run.offset + run.length) - offset
            if run.parent_offset is None:
                parts.append(bytes(take))
            else:
                data = self.parent.read_at(run.parent_offset + offset - run.offset, take)
                parts.append(data)
                if len(data) != take:
                    break
            offset += take
            idx += 1
        return b"".join(parts)


class SourceReader(io.RawIOBase):
    """A read-only, seekable file object over a :class:`ByteSource`, with a bounded block cache.

    This is what dissect's parsers are given. It keeps a file position, so one instance must
    only be used by one thread at a time; the cache itself is locked and may be shared by
    readers created with :meth:`clone`.
    """

    def __init__(
        self,
        source: ByteSource,
        *,
        block_size: int = CACHE_BLOCK_SIZE,
        max_blocks: int = CACHE_BLOCKS,
        _cache: _BlockCache | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.size = source.size
        self._pos = 0
        self._cache = _cache or _BlockCache(source, block_size, max_blocks)

    def clone(self) -> SourceReader:
        """A new reader with its own position that shares this reader's cache."""
        return SourceReader(self.source, _cache=self._cache)

    @property
    def cache_stats(self) -> tuple[int, int]:
        """``(hits, misses)`` of the block cache, for benchmarks and tests."""
        return self._cache.hits, self._cache.misses

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            new = pos
        elif whence == io.SEEK_CUR:
            new = self._pos + pos
        elif whence == io.SEEK_END:
            new = self.size + pos
        else:
            raise ValueError(f"invalid whence {whence}")
        if new < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = new
        return new

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self.size - self._pos)
        data = self._cache.read(self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)


class _BlockCache:
    """LRU cache of aligned blocks of a source; large reads bypass it."""

    def __init__(self, source: ByteSource, block_size: int, max_blocks: int) -> None:
        self.source = source
        self.block_size = block_size
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def read(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.source.size - offset))
        if size == 0:
            return b""
        if size >= 2 * self.block_size:
            # Bulk data (a whole extent read by dissect): caching it would only evict metadata.
            return self.source.read_at(offset, size)
        bs = self.block_size
        first, last = offset // bs, (offset + size - 1) // bs
        parts = [self._block(i) for i in range(first, last + 1)]
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
        start = offset - first * bs
        return buf[start : start + size]

    def _block(self, index: int) -> bytes:
        with self._lock:
            data = self._blocks.get(index)
            if data is not None:
                self._blocks.move_to_end(index)
                self.hits += 1
                return data
            self.misses += 1
        data = self.source.read_at(index * self.block_size, self.block_size)
        with self._lock:
            self._blocks[index] = data
            self._blocks.move_to_end(index)
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
        return data
