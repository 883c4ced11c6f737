"""Where a sparse file holds data: SEEK_DATA/SEEK_HOLE runs, for file backups and raw disk images.

A module of its own, so that the image path (``ihb backup-image``, VM backups) does not import the
content-defined chunker.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_data) runs covering [0, size), using SEEK_DATA/SEEK_HOLE."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                yield pos, size - pos, False
                return
            if e.errno == errno.EINVAL:  # filesystem without SEEK_DATA
                yield pos, size - pos, True
                return
            raise
        if data > pos:
            yield pos, min(data, size) - pos, False
        if data >= size:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield data, hole - data, True
        pos = hole
