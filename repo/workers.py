"""Bounded thread pools for the C-heavy work (BLAKE3, zstd, AES release the GIL).

One rule keeps memory bounded however large the input: at most ``max_inflight`` submitted tasks may
be unfinished; ``submit`` waits for the oldest before accepting more.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def default_threads() -> int:
    env = os.environ.get("IHB_THREADS")
    if env:
        return max(1, int(env))
    return max(2, os.cpu_count() or 2)


class Pipeline:
    def __init__(self, threads: int | None = None, max_inflight: int | None = None) -> None:
        self.threads = threads or default_threads()
        self.max_inflight = max_inflight or self.threads * 4
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ihb-work")
        self._inflight: deque[Future[Any]] = deque()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        while len(self._inflight) >= self.max_inflight:
            self._inflight.popleft().result()
        fut = self._pool.submit(fn, *args)
        self._inflight.append(fut)
        while self._inflight and self._inflight[0].done():
            self._inflight.popleft().result()
        return fut

    def drain(self) -> None:
        while self._inflight:
            self._inflight.popleft().result()

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(cancel=exc_type is not None)


def ordered_map(fn: Callable[[T], Any], items: Iterable[T], pool: ThreadPoolExecutor, window: int) -> Iterator[Any]:
    """Apply ``fn`` on the pool with up to ``window`` items ahead, yielding results in input order
    (readahead for restores and sequential reads)."""
    q: deque[Future[Any]] = deque()
    it = iter(items)
    for item in it:
        q.append(pool.submit(fn, item))
        if len(q) >= window:
            break
    while q:
        fut = q.popleft()
        nxt = next(it, _SENTINEL)
        if nxt is not _SENTINEL:
            q.append(pool.submit(fn, nxt))
        yield fut.result()


_SENTINEL: Any = object()


def in_background(items: Iterable[T], ahead: int, name: str = "ihb-reader") -> Iterator[T]:
    """Iterate ``items`` on a thread of its own, at most ``ahead`` items ahead of the consumer: a source
    that waits on a socket or a disk (NBD replies, preads; they release the GIL) keeps reading while the
    consumer works, instead of only when asked. Errors re-raise in the consumer; leaving the loop
    early stops the thread after its current item."""
    q: queue.Queue[tuple[int, Any]] = queue.Queue(max(1, ahead))
    stop = threading.Event()

    def put(tag: int, value: Any) -> bool:
        while not stop.is_set():
            try:
                q.put((tag, value), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(0, item):
                    return
            put(1, None)
        except BaseException as e:  # handed to the consumer, raised there
            put(2, e)

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    try:
        while True:
            tag, value = q.get()
            if tag == 1:
                return
            if tag == 2:
                raise value
            yield value
    finally:
        stop.set()
        t.join()
