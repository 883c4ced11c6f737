"""repo.workers.in_background: order, errors, early exit and bounded read-ahead."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from repo.workers import in_background


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ihb-reader"]


def test_items_arrive_in_order_and_the_thread_ends() -> None:
    assert list(in_background(iter(range(1000)), 4)) == list(range(1000))
    assert not _readers()


def test_an_error_of_the_source_is_raised_in_the_consumer_after_the_items_before_it() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError(5, "disk read failed")

    got = []
    with pytest.raises(OSError, match="disk read failed"):
        for x in in_background(source(), 2):
            got.append(x)
    assert got == [1, 2]
    assert not _readers()


def test_leaving_early_stops_the_reader_and_it_never_runs_far_ahead() -> None:
    produced = []

    def source() -> Iterator[int]:
        for i in range(10_000):
            produced.append(i)
            yield i

    it = in_background(source(), 3)
    assert next(it) == 0
    time.sleep(0.3)  # the reader fills its queue, then waits
    assert len(produced) <= 1 + 3 + 1  # taken + queued + the one waiting to be queued
    it.close()
    assert not _readers()
    assert len(produced) <= 5
