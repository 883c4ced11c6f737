"""Content-defined chunking of file data (FastCDC, Cython) with a per-repository secret gear seed.

The seed comes from the repository key, so chunk boundaries, like chunk ids, reveal nothing that an
observer without the key could compare across repositories.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from pyfastcdc import FastCDC

READ_BLOCK = 4 * 1024 * 1024


class _ExtentReader:
    """``readinto`` over one byte range of a file descriptor (pyfastcdc prefers readinto)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        self.fd, self.pos, self.left = fd, start, length

    def readinto(self, b: memoryview) -> int:
        if self.left <= 0:
            return 0
        n = min(len(b), self.left)
        got = os.preadv(self.fd, [b[:n]], self.pos)
        self.pos += got
        self.left -= got
        return got


class FileChunker:
    def __init__(self, min_size: int, avg_size: int, max_size: int, seed: int) -> None:
        # pyfastcdc's average excludes the minimum (cut-point skipping), so pass avg - min.
        self._cdc = FastCDC(avg_size - min_size, min_size=min_size, max_size=max_size, seed=seed)
        self.min_size = min_size

    def chunks(self, fd: int, start: int, length: int) -> Iterator[bytes]:
        if length <= self.min_size:  # small files: one chunk, no chunker set-up cost
            data = os.pread(fd, length, start)
            if data:
                yield data
            return
        for c in self._cdc.cut_stream(_ExtentReader(fd, start, length)):
            yield bytes(c.data)  # the view is only valid until the next chunk
