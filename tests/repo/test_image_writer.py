"""ImageWriter / ImageReader against a reference bytearray: full images and incrementals over several map
pages, partial chunks, zero ranges and chunks handed to workers in batches."""

from __future__ import annotations

import random

from repo import format as fmt
from repo.image import BATCH_BYTES, ImageReader, ImageWriter
from repo.repository import Repository
from repo.snapshot import DiskRecord
from repo.workers import Pipeline

CS = 4096  # small chunks: several map pages (IMAGE_MAP_PAGE entries each) in a 20 MiB disk
SIZE = (fmt.IMAGE_MAP_PAGE * 2 + 1000) * CS + 123  # a short last chunk too


def _write(repo: Repository, ops: list[tuple[str, int, bytes | int]], base: DiskRecord | None) -> DiskRecord:
    w = repo.writer()
    with Pipeline() as pipe:
        iw = ImageWriter(repo, w, pipe, "vda", SIZE, base=base, chunk_size=None if base else CS)
        for op, off, arg in ops:
            if op == "w":
                assert isinstance(arg, bytes)
                iw.write(off, arg)
            else:
                assert isinstance(arg, int)
                iw.zero(off, arg)
        rec = iw.finish()
    w.flush()
    return rec


def _check(repo: Repository, rec: DiskRecord, ref: bytearray, rnd: random.Random) -> None:
    r = ImageReader(repo, rec)
    assert r.read(0, SIZE) == bytes(ref)
    for _ in range(200):
        off = rnd.randrange(SIZE)
        n = rnd.randrange(1, 3 * CS)
        assert r.read(off, n) == bytes(ref[off : off + n])


def test_full_then_incremental_round_trip(repo: Repository) -> None:
    rnd = random.Random(7)
    ref = bytearray(SIZE)
    ops: list[tuple[str, int, bytes | int]] = []
    pos = 0
    while pos < SIZE:  # extents in increasing order: data (odd sizes and offsets), zeros, holes
        n = min(rnd.choice([100, CS, 3 * CS + 17, 40 * CS]), SIZE - pos)
        kind = rnd.random()
        if kind < 0.5:
            data = rnd.randbytes(n)
            ops.append(("w", pos, data))
            ref[pos : pos + n] = data
        elif kind < 0.6:
            ops.append(("z", pos, n))
        pos += n + rnd.choice([0, 0, 5, CS])
    full = _write(repo, ops, None)
    assert full.chunk_size == CS and len(full.pages) == 3
    assert full.stats["data_chunks"] * CS > 2 * BATCH_BYTES  # many batches
    _check(repo, full, ref, rnd)

    # An incremental: scattered small changes (partial chunks merged with the base), zeroed ranges.
    inc_ops: list[tuple[str, int, bytes | int]] = []
    pos = rnd.randrange(CS)
    while pos < SIZE - 4 * CS:
        if rnd.random() < 0.8:
            data = rnd.randbytes(rnd.choice([1, 512, CS, 2 * CS + 1]))
            inc_ops.append(("w", pos, data))
            ref[pos : pos + len(data)] = data
            pos += len(data)
        else:
            n = rnd.choice([CS, 5 * CS])
            inc_ops.append(("z", pos, n))
            ref[pos : pos + n] = bytes(n)
            pos += n
        pos += rnd.randrange(1, 300 * CS)
    inc = _write(repo, inc_ops, full)
    assert inc.stats["base_reads"] > 0
    _check(repo, inc, ref, rnd)
    # the base restore point is untouched
    assert ImageReader(repo, full).read(0, SIZE) != bytes(ref)


def test_scattered_changes_in_batches(repo: Repository) -> None:
    """Scattered single-chunk changes, as an incremental of a dirty bitmap writes them, incompressible
    and compressible: stored in batches across map pages, and read back exactly."""
    rnd = random.Random(11)
    ref = bytearray(SIZE)
    full = _write(repo, [], None)
    for kind in ("random", "text"):
        ops: list[tuple[str, int, bytes | int]] = []
        for blk in sorted(rnd.sample(range(SIZE // CS), 2000)):
            data = rnd.randbytes(CS) if kind == "random" else (rnd.randbytes(8).hex().encode() * CS)[:CS]
            ops.append(("w", blk * CS, data))
            ref[blk * CS : blk * CS + CS] = data
        inc = _write(repo, ops, full)
        st = inc.stats
        assert st["data_chunks"] == 2000 and st["base_reads"] == 0, st
        assert st["batches"] >= st["data_chunks"] * CS // BATCH_BYTES >= 7
        _check(repo, inc, ref, rnd)
        full = inc
