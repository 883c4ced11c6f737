"""The index learns packs written or deleted behind its back (another appliance, a crashed writer) while
an open lists only the pack directories whose mtime changed since a listing known to be complete."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import repo.repository as repository
from repo import format as fmt
from repo.repository import Repository


def _packs_on_disk(loc: str) -> set[bytes]:
    out = set()
    for _, _, files in os.walk(os.path.join(loc, "data")):
        for f in files:
            pid = fmt.pack_id_from_name(f)
            if pid is not None:
                out.add(pid)
    return out


def _write_elsewhere(loc: str, cache: Path, n: int) -> None:
    """Another appliance (an index of its own) stores n blobs of ~300 KB: one 256 KiB pack each."""
    with Repository.open(loc, lambda: b"pw", cache_dir=str(cache)) as other:
        w = other.writer()
        for _ in range(n):
            w.add(fmt.BlobKind.DATA, os.urandom(300_000))
        w.flush()


def _open(loc: str, cache: Path) -> Repository:
    return Repository.open(loc, lambda: b"pw", cache_dir=str(cache))


def test_packs_added_and_deleted_behind_the_index_are_found(repo_path: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "mine"
    _write_elsewhere(repo_path, tmp_path / "other", 20)
    with _open(repo_path, mine) as r:
        assert set(r.index.packs()) == _packs_on_disk(repo_path)
        states = r.index.pack_dir_states()
        assert states and not any(done for _, _, done in states.values())  # first sight: not yet trusted

    monkeypatch.setattr(repository, "RACY_NS", 0)  # as if two seconds had passed
    with _open(repo_path, mine) as r:
        assert all(done for _, _, done in r.index.pack_dir_states().values())

    # another appliance adds packs, and one disappears (its GC): both are seen at the next open
    _write_elsewhere(repo_path, tmp_path / "other", 20)
    gone = sorted(_packs_on_disk(repo_path))[0]
    os.unlink(os.path.join(repo_path, fmt.pack_name(gone)))
    with _open(repo_path, mine) as r:
        assert set(r.index.packs()) == _packs_on_disk(repo_path)
        assert gone not in r.index.packs()

    # a whole pack directory removed: its packs are forgotten
    victim = next(p for p in sorted(_packs_on_disk(repo_path)))
    d = os.path.dirname(os.path.join(repo_path, fmt.pack_name(victim)))
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)
    with _open(repo_path, mine) as r:
        assert set(r.index.packs()) == _packs_on_disk(repo_path)
        assert victim not in r.index.packs()


def test_a_change_within_the_same_mtime_tick_is_not_missed(repo_path: str, tmp_path: Path) -> None:
    """Packs linked in while their directory keeps the mtime we recorded (the same coarse clock tick): a
    listing is trusted only once it started RACY_NS after that mtime was first seen, so the next open
    lists those directories again and finds the packs."""
    mine = tmp_path / "mine"
    _write_elsewhere(repo_path, tmp_path / "other", 5)
    with _open(repo_path, mine) as r:
        states = r.index.pack_dir_states()
    assert set(states) == {p.hex()[:2] for p in _packs_on_disk(repo_path)}
    assert not any(done for _, _, done in states.values())
    new: set[bytes] = set()
    with _open(repo_path, tmp_path / "other") as other:
        w = other.writer()
        for _ in range(2000):  # until a new pack lands in a directory whose mtime was recorded
            before = _packs_on_disk(repo_path)
            w.add(fmt.BlobKind.DATA, os.urandom(300_000))
            w.flush()
            new = {p for p in _packs_on_disk(repo_path) - before if p.hex()[:2] in states}
            if new:
                break
    assert new
    for pid in new:  # hide the change from the mtime
        d = os.path.join(repo_path, "data", pid.hex()[:2])
        os.utime(d, ns=(states[pid.hex()[:2]][0], states[pid.hex()[:2]][0]))
    with _open(repo_path, mine) as r:
        assert new <= set(r.index.packs())


def test_everything_is_listed_again_after_an_hour_whatever_the_mtimes_say(repo_path: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system that does not keep directory mtimes, a pack deleted behind the index is forgotten
    at the first open after FULL_LISTING_NS."""
    mine = tmp_path / "mine"
    _write_elsewhere(repo_path, tmp_path / "other", 10)
    monkeypatch.setattr(repository, "RACY_NS", 0)
    for _ in range(2):  # the second open makes every listing trusted
        with _open(repo_path, mine) as r:
            pass
    gone = sorted(_packs_on_disk(repo_path))[0]
    d = os.path.dirname(os.path.join(repo_path, fmt.pack_name(gone)))
    mtime = os.stat(d).st_mtime_ns
    os.unlink(os.path.join(repo_path, fmt.pack_name(gone)))
    os.utime(d, ns=(mtime, mtime))  # as if the file system had not noticed
    with _open(repo_path, mine) as r:
        assert gone in r.index.packs()  # trusted: not listed
    monkeypatch.setattr(repository, "FULL_LISTING_NS", 0)
    with _open(repo_path, mine) as r:
        assert gone not in r.index.packs()
        assert set(r.index.packs()) == _packs_on_disk(repo_path)
