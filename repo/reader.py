"""Reading file content back: chunk lookups by offset and parallel readahead.

Used by restore, ``ihb cat`` and the FUSE view. Decryption and decompression run on a shared pool so
both cores work while the caller writes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import format as fmt
from .repository import Repository
from .workers import default_threads, ordered_map

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(default_threads(), thread_name_prefix="ihb-read")
        return _pool


class ChunkCache:
    """A bounded LRU of plaintext chunks, by total bytes."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._d: OrderedDict[bytes, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, cid: bytes) -> bytes | None:
        with self._lock:
            v = self._d.get(cid)
            if v is not None:
                self._d.move_to_end(cid)
            return v

    def put(self, cid: bytes, data: bytes) -> None:
        with self._lock:
            if cid in self._d or len(data) > self.max_bytes:
                return
            self._d[cid] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                _, v = self._d.popitem(last=False)
                self._size -= len(v)


class ChunkSource:
    """get(chunk id) with a cache; the one place content chunks are fetched from a repository."""

    def __init__(self, repo: Repository, cache: ChunkCache | None = None) -> None:
        self.repo = repo
        self.cache = cache or ChunkCache()

    def get(self, cid: bytes) -> bytes:
        v = self.cache.get(cid)
        if v is None:
            v = self.repo.get_blob(fmt.BlobKind.DATA, cid)
            self.cache.put(cid, v)
        return v


def iter_content(repo: Repository, content: list[list[Any]], window: int = 8) -> Iterator[tuple[bytes | None, int]]:
    """Yield (plaintext or None for a hole, length) in order, fetching ahead on the shared pool."""

    def fetch(part: list[Any]) -> tuple[bytes | None, int]:
        cid, ln = part
        if cid is None:
            return None, ln
        return repo.get_blob(fmt.BlobKind.DATA, cid), ln

    yield from ordered_map(fetch, content, shared_pool(), window)
