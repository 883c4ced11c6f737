"""The bitmap lifecycle rules of `ihb vm backup`, as pure functions: when an incremental is allowed, what
happens to leftovers of interrupted runs, and how dirty extents become reads and holes."""

from __future__ import annotations

import socket
from pathlib import Path

from appliance.hypervisor.vmbackup import (
    BitmapInfo,
    clip_runs,
    merge_runs,
    parse_generation,
    plan_disk,
    targets_in_dir,
)
from repo.snapshot import DiskRecord, Snapshot
from tests.util import ihb

P = "ihb-0123abcd-"
SIZE = 64 << 20


def rp(gen: int, *, disk: str = "vda", size: int = SIZE, prefix: str = P, sid: str | None = None) -> Snapshot:
    return Snapshot(id=sid or f"{gen:064x}", kind="image", host="h", time_ns=gen, disks=[DiskRecord(disk, size, 262144, [])],
                    meta={"vm": "vm1", "cbt": {"prefix": prefix, "generation": gen, "bitmaps": {disk: {"name": f"{prefix}{gen}"}}}})


def bm(gen: int | str, *, inconsistent: bool = False, recording: bool = True) -> BitmapInfo:
    name = gen if isinstance(gen, str) else f"{P}{gen}"
    return BitmapInfo(name=name, count=0, recording=recording, persistent=True, inconsistent=inconsistent)


def test_first_backup_is_full() -> None:
    p = plan_disk("vda", SIZE, [], [], P)
    assert (p.mode, p.base_bitmap, p.merge, p.remove) == ("full", None, [], [])
    assert "first backup" in p.reason


def test_incremental_needs_bitmap_and_matching_restore_point() -> None:
    p = plan_disk("vda", SIZE, [bm(3)], [rp(2), rp(3)], P)
    assert (p.mode, p.base_bitmap) == ("incremental", f"{P}3")
    assert p.base_snapshot is not None and p.base_snapshot.meta["cbt"]["generation"] == 3
    assert p.base_record is not None and p.base_record.name == "vda"


def test_bitmap_without_restore_point_in_this_repository_means_full() -> None:
    # the restore point of generation 3 was pruned, or belongs to another repository
    p = plan_disk("vda", SIZE, [bm(3)], [rp(2)], P)
    assert p.mode == "full" and p.remove == [f"{P}3"] and p.base_bitmap is None
    p = plan_disk("vda", SIZE, [bm(3)], [rp(3, prefix="ihb-ffffffff-")], P)
    assert p.mode == "full"


def test_leftovers_of_killed_runs_are_merged_into_the_base_never_dropped() -> None:
    p = plan_disk("vda", SIZE, [bm(3, recording=False), bm(4), bm(5)], [rp(3)], P)
    assert (p.mode, p.base_bitmap, p.merge, p.remove) == ("incremental", f"{P}3", [f"{P}4", f"{P}5"], [])


def test_older_generations_are_removed() -> None:
    # killed after the commit but before the old bitmap was removed: 2 is older than restore point 3
    p = plan_disk("vda", SIZE, [bm(2), bm(3)], [rp(2), rp(3)], P)
    assert (p.base_bitmap, p.merge, p.remove) == (f"{P}3", [], [f"{P}2"])


def test_inconsistent_bitmaps_are_never_used() -> None:
    p = plan_disk("vda", SIZE, [bm(3, inconsistent=True)], [rp(3)], P)
    assert p.mode == "full" and p.remove == [f"{P}3"]


def test_foreign_bitmaps_are_untouched() -> None:
    p = plan_disk("vda", SIZE, [bm("libvirt-backup-1"), bm("ihb-ffffffff-9"), bm(1)], [rp(1)], P)
    assert p.mode == "incremental" and p.remove == [] and p.merge == []


def test_resized_or_new_disk_is_copied_in_full() -> None:
    assert plan_disk("vda", 2 * SIZE, [bm(3)], [rp(3)], P).mode == "full"
    assert plan_disk("vdc", SIZE, [bm(3)], [rp(3)], P).mode == "full"


def test_forced_full_keeps_the_base_bitmap_for_a_merge_back() -> None:
    p = plan_disk("vda", SIZE, [bm(3)], [rp(3)], P, full=True)
    assert (p.mode, p.base_bitmap, p.remove) == ("full", f"{P}3", [])


def test_parse_generation() -> None:
    assert parse_generation(P, f"{P}12") == 12
    assert parse_generation(P, f"{P}x") is None
    assert parse_generation(P, "ihb-other-1") is None


def test_clip_runs_turns_discarded_dirty_blocks_into_holes() -> None:
    alloc = [(0, 100, True), (100, 50, False), (150, 850, True)]
    dirty = [(90, 20), (140, 20), (500, 10)]
    assert merge_runs(clip_runs(dirty, alloc)) == [
        (90, 10, True), (100, 10, False), (140, 10, False), (150, 10, True), (500, 10, True)]


def test_targets_in_dir(tmp_path: Path) -> None:
    socks = []
    for name in ("a.qmp", "b.sock", "a.qga"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(tmp_path / name))
        socks.append(s)
    (tmp_path / "c.qmp").write_text("not a socket")
    t = targets_in_dir(str(tmp_path))
    assert [(x.vm, Path(x.qmp).name, x.agent and Path(x.agent).name) for x in t] == [
        ("a", "a.qmp", "a.qga"), ("b", "b.sock", None)]
    for s in socks:
        s.close()


def test_a_vm_that_is_not_running_is_one_clear_line(tmp_path: Path) -> None:
    """No socket, or a socket nobody listens on: exit code 31, one line that says which, no traceback,
    and at once (no waiting for a QEMU that is not coming)."""
    env = {"IHB_REPO": str(tmp_path / "repo"), "IHB_PASSPHRASE": "pw", "IHB_CACHE_DIR": str(tmp_path / "cache"),
           "IHB_DATA_DIR": str(tmp_path / "data"), "IHB_CONFIG_DIR": str(tmp_path / "etc")}
    ihb("init", env=env)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.qmp"))  # bound, never listening: connect() is refused
    try:
        for name, why in (("missing.qmp", "no such socket"), ("dead.qmp", "connection refused")):
            path = str(tmp_path / name)
            p = ihb("vm", "backup", "--qmp", path, "--vm", "web1", env=env, check=False, timeout=30)
            err = p.stderr.decode()
            assert p.returncode == 31, err
            assert err.strip().splitlines() == [
                f"ihb: error: cannot talk to QEMU at {path}: {why}; the QEMU process that would serve it is not running"]
    finally:
        dead.close()
