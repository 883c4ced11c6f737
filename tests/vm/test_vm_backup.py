"""`ihb vm backup` against the real test guest under QEMU (TCG): full, incremental, interrupted runs,
quiescing, free-block skipping, persistence of the bitmaps, and many VMs at once.

Every restore point taken while the VM is paused is compared byte for byte (qemu-img compare) with the
disk as QEMU serves it at that moment; so a lost write, a stale block or a wrong bitmap fails here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.hypervisor.qmp import GuestAgent
from appliance.hypervisor.vmbackup import STALL_ENV, STALL_MARKER, VMBackupOptions, backup_vm
from repo.repository import Repository
from tests.guest.vm import PART_OFFSET, Disk, GuestVM, debugfs_cat, make_disk
from tests.util import ihb
from tests.vm.conftest import PASSPHRASE, compare_with_live, guest_sh, ihb_bitmaps, ihb_json, leftovers

StartGuest = Callable[..., GuestVM]
MiB = 1 << 20
VM = "guest1"
NIC = ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:12:34:56,romfile="]


def _disks(tmp_path: Path) -> list[Disk]:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("guest1\n")
    raw = make_disk(tmp_path / "sys.raw", 64, src)
    qcow = tmp_path / "vda.qcow2"  # qcow2: persistent bitmaps
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow], check=True)
    raw.unlink()
    data = tmp_path / "vdb.raw"  # raw: the bitmap lives only as long as the QEMU process
    data.write_bytes(b"")
    os.truncate(data, 32 * MiB)
    return [Disk("vda", qcow, "qcow2"), Disk("vdb", data, "raw")]


def _backup(env: dict[str, str], qmp: Path, *extra: str) -> dict[str, Any]:
    rc, out = ihb_json(env, "vm", "backup", "--qmp", str(qmp), "--vm", VM, *extra)
    assert rc == 0 and out["ok"], out
    return out


def _stop(vm: GuestVM) -> None:
    vm.qmp.execute("stop")


def _cont(vm: GuestVM) -> None:
    vm.qmp.execute("cont")


def _one_bitmap_per_disk(vm: GuestVM) -> dict[str, dict[str, Any]]:
    bms = ihb_bitmaps(vm.qmp)
    assert sorted(bms) == ["vda", "vdb"], bms
    for node, lst in bms.items():
        assert len(lst) == 1 and lst[0]["recording"], f"{node}: {lst}"
    return {node: lst[0] for node, lst in bms.items()}


def _stalled_backup(env: dict[str, str], qmp: Path, tmp_path: Path, at: str = "1") -> subprocess.Popen[bytes]:
    """`ihb vm backup` that stops and waits: mid-pull (after the transaction, inside the NBD reads) or,
    with ``at="frozen"``, while the guest file systems are frozen."""
    with open(tmp_path / "stalled.err", "wb") as err:
        p = subprocess.Popen([sys.executable, "-m", "appliance.cli", "vm", "backup", "--qmp", str(qmp), "--vm", VM],
                             env={**os.environ, **env, STALL_ENV: at}, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 120
    while STALL_MARKER not in (tmp_path / "stalled.err").read_text(errors="replace"):
        assert p.poll() is None, f"ihb exited early: {(tmp_path / 'stalled.err').read_text()}"
        assert time.monotonic() < deadline, "ihb never reached the pull"
        time.sleep(0.05)
    return p


def test_full_incremental_interrupted_and_quiesced(start_guest: StartGuest, tmp_path: Path, sock_dir: Path,
                                                   repo_env: dict[str, str]) -> None:
    qmp = sock_dir / f"{VM}.qmp"  # ihb's own monitor: the test keeps the first one
    vm = start_guest(_disks(tmp_path), action="serve", extra_args=["-qmp", f"unix:{qmp},server=on,wait=off", *NIC])
    vm.wait_serial("IHBGUEST: READY", 120)
    nbd = sock_dir / "cmp.sock"
    guest_sh(vm, "dd if=/dev/urandom of=/mnt/a.bin bs=64k count=16 2>/dev/null && "
                 "dd if=/dev/urandom of=/dev/vdb bs=64k count=8 seek=16 conv=fsync 2>/dev/null && sync")

    # 1. full backup of the paused VM == the disks at that moment ----------------------------------------
    _stop(vm)
    r1 = _backup(repo_env, qmp)
    assert r1["consistency"] == "crash"
    assert "not running" in _load(repo_env, r1["id"]).meta["quiesce"]["note"]
    assert {d: s["mode"] for d, s in r1["disk_stats"].items()} == {"vda": "full", "vdb": "full"}
    assert r1["disk_stats"]["vdb"]["read_bytes"] == 512 * 1024  # only the written 512 KiB of the sparse raw disk
    # VM disks are chunked at the bitmap granularity: an incremental then stores only dirty blocks
    assert {d.name: d.chunk_size for d in _load(repo_env, r1["id"]).disks} == {"vda": 65536, "vdb": 65536}
    compare_with_live(vm, repo_env, r1["id"], ["vda", "vdb"], tmp_path, nbd)
    bm1 = _one_bitmap_per_disk(vm)
    assert bm1["vda"]["persistent"] and not bm1["vdb"]["persistent"]
    _cont(vm)

    # 2. more writes; incremental reads about what changed ------------------------------------------------
    guest_sh(vm, "dd if=/dev/urandom of=/mnt/b.bin bs=64k count=32 2>/dev/null && "
                 "dd if=/dev/urandom of=/mnt/a.bin bs=64k count=2 seek=4 conv=notrunc 2>/dev/null && "
                 "dd if=/dev/urandom of=/dev/vdb bs=64k count=4 seek=100 conv=fsync 2>/dev/null && sync")
    _stop(vm)
    dirty = {node: b["count"] for node, b in _one_bitmap_per_disk(vm).items()}
    r2 = _backup(repo_env, qmp)
    ds = r2["disk_stats"]
    assert {d: s["mode"] for d, s in ds.items()} == {"vda": "incremental", "vdb": "incremental"}
    for d in ("vda", "vdb"):
        assert ds[d]["read_bytes"] <= 1.5 * dirty[d], (d, ds[d]["read_bytes"], dirty[d])
    assert ds["vdb"]["read_bytes"] == 256 * 1024
    assert ds["vda"]["base_reads"] == ds["vdb"]["base_reads"] == 0  # no partly dirty chunk to merge
    assert 2 * MiB <= ds["vda"]["read_bytes"] <= 8 * MiB  # 2 MiB + 128 KiB of file data, plus ext4 metadata
    assert r2["parent"] == r1["id"]
    print(f"\nincremental read vs dirty bitmap: {({d: (ds[d]['read_bytes'], dirty[d]) for d in ds})}")
    compare_with_live(vm, repo_env, r2["id"], ["vda", "vdb"], tmp_path, nbd)
    _cont(vm)

    # 3a. a failure in the middle of the pull (in-process): bitmaps merged back, QEMU cleaned up ---------
    guest_sh(vm, "dd if=/dev/urandom of=/mnt/c.bin bs=64k count=16 2>/dev/null && "
                 "dd if=/dev/urandom of=/dev/vdb bs=64k count=2 seek=200 conv=fsync 2>/dev/null && sync")
    before = {node: b["count"] for node, b in _one_bitmap_per_disk(vm).items()}

    def fail_mid_pull(stats: dict[str, Any], disk: str) -> None:
        if stats["bytes"] > 0:
            raise RuntimeError("injected failure mid-pull")

    with Repository.open(repo_env["IHB_REPO"], lambda: PASSPHRASE.encode()) as repo, \
            pytest.raises(RuntimeError, match="injected"):
        backup_vm(repo, str(qmp), VM, VMBackupOptions(use_agent=False), progress=fail_mid_pull)
    assert leftovers(vm.qmp) == []
    after = {node: b["count"] for node, b in _one_bitmap_per_disk(vm).items()}
    assert all(after[n] >= before[n] for n in before), (before, after)

    # 3b. SIGTERM mid-pull: same clean-up, from the CLI ---------------------------------------------------
    p = _stalled_backup(repo_env, qmp, tmp_path)
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 130
    assert leftovers(vm.qmp) == []
    _one_bitmap_per_disk(vm)

    # 3c. SIGKILL mid-pull leaves QEMU objects and two bitmaps; writes go on; the retry loses nothing -----
    p = _stalled_backup(repo_env, qmp, tmp_path)
    p.kill()
    p.wait(30)
    assert leftovers(vm.qmp), "a killed run leaves its export/job/node behind"
    assert all(len(v) == 2 for v in ihb_bitmaps(vm.qmp).values())
    guest_sh(vm, "dd if=/dev/urandom of=/mnt/d.bin bs=64k count=8 2>/dev/null && "
                 "dd if=/dev/urandom of=/dev/vdb bs=64k count=2 seek=300 conv=fsync 2>/dev/null && sync")
    _stop(vm)
    r3 = _backup(repo_env, qmp)
    assert r3["run"]["leftovers_removed"]
    assert {d: s["mode"] for d, s in r3["disk_stats"].items()} == {"vda": "incremental", "vdb": "incremental"}
    assert r3["disk_stats"]["vdb"]["read_bytes"] == 256 * 1024  # seek=200 and seek=300, 128 KiB each
    compare_with_live(vm, repo_env, r3["id"], ["vda", "vdb"], tmp_path, nbd)
    assert leftovers(vm.qmp) == []
    _one_bitmap_per_disk(vm)
    _cont(vm)

    # 3d. SIGKILL while the guest is frozen: the thaw guard thaws it; the next run cleans the rest ---------
    p = _stalled_backup(repo_env, qmp, tmp_path, at="frozen")  # it holds the agent: cannot look inside now
    p.kill()
    p.wait(30)
    deadline = time.monotonic() + 60
    while _fsfreeze_status(vm) != "thawed":
        assert time.monotonic() < deadline, "the guest stayed frozen after the backup was killed"
        time.sleep(0.5)
    assert "thaw guard: thawed" in (tmp_path / "stalled.err").read_text()  # the guard's stderr is ihb's

    # 4. running VM with the agent: frozen file systems, blocks of a deleted file not read ----------------
    guest_sh(vm, "dd if=/dev/urandom of=/mnt/x.bin bs=64k count=64 2>/dev/null && sync && rm /mnt/x.bin && "
                 "echo quiesced-write > /mnt/e.txt && sync")
    r4 = _backup(repo_env, qmp, "--no-trim")
    q = r4["run"]
    snap4 = _load(repo_env, r4["id"])
    assert r4["consistency"] == "filesystem", snap4.meta["quiesce"]
    assert any(x.startswith("node ihb-fleece-") for x in r4["run"]["leftovers_removed"])  # from 3d
    assert snap4.meta["quiesce"]["agent"] and "fstrim" not in snap4.meta["quiesce"]
    assert 0 < snap4.meta["quiesce"]["freeze_seconds"] < 10, q
    assert r4["disk_stats"]["vda"]["free_skipped_bytes"] >= 3 * MiB  # x.bin: written, deleted, never read
    print(f"freeze held {snap4.meta['quiesce']['freeze_seconds']} s; free-skipped "
          f"{r4['disk_stats']['vda']['free_skipped_bytes']} B; full read {r1['stats']['read_bytes']} B")
    assert guest_sh(vm, "cat /proc/mounts | grep ' /mnt ' >/dev/null && touch /mnt/thawed && echo ok") == b"ok\n"
    img = tmp_path / "r4-vda.raw"
    ihb("restore-disk", r4["id"], "vda", str(img), env=repo_env)
    assert debugfs_cat(img, "/e.txt") == "quiesced-write\n"
    part = tmp_path / "r4-part.ext4"
    subprocess.run(["dd", f"if={img}", f"of={part}", "bs=1M", f"skip={PART_OFFSET // MiB}", "status=none"], check=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr  # frozen => clean, no journal replay needed

    # 5. default: fstrim first; QEMU's view of the VM is recorded ------------------------------------------
    r5 = _backup(repo_env, qmp)
    snap5 = _load(repo_env, r5["id"])
    assert "/mnt" in snap5.meta["quiesce"]["fstrim"]["paths"], snap5.meta["quiesce"]
    qemu = snap5.meta["qemu"]
    assert qemu["machine"].startswith("pc-") and qemu["memory_bytes"] == 256 * MiB and qemu["cpus"]["count"] == 1
    assert qemu["nics"] == [{"id": "nic0", "model": "virtio-net-pci", "mac": "52:54:00:12:34:56", "netdev": "n0"}]
    assert [(d["name"], d["size"], d["format"]) for d in qemu["disks"]] == [("vda", 64 * MiB, "qcow2"),
                                                                           ("vdb", 32 * MiB, "raw")]
    assert snap5.meta["cbt"]["generation"] > snap4.meta["cbt"]["generation"]
    rc, listing = ihb_json(repo_env, "vm", "list")
    assert [(r["mode"], r["consistency"]) for r in listing[VM]] == [
        ("full", "crash"), ("incremental", "crash"), ("incremental", "crash"),
        ("incremental", "filesystem"), ("incremental", "filesystem")]

    # 6. QEMU restarts: the qcow2 disk's bitmap persisted (incremental), the raw disk's did not (full) -----
    assert vm.powerdown(60) == 0
    qmp.unlink(missing_ok=True)
    vm2 = start_guest(_same_disks(vm), paused=True, agent=False,
                      extra_args=["-qmp", f"unix:{qmp},server=on,wait=off"])
    r6 = _backup(repo_env, qmp)
    assert {d: s["mode"] for d, s in r6["disk_stats"].items()} == {"vda": "incremental", "vdb": "full"}
    compare_with_live(vm2, repo_env, r6["id"], ["vda", "vdb"], tmp_path, nbd)


def _fsfreeze_status(vm: GuestVM) -> str:
    with GuestAgent(vm.qga_path, timeout=30) as ga:
        ga.ping(timeout=30)
        return ga.fsfreeze_status()


def _same_disks(vm: GuestVM) -> list[Disk]:
    return list(vm.disks)


def _load(env: dict[str, str], sid: str) -> Any:
    with Repository.open(env["IHB_REPO"], lambda: PASSPHRASE.encode()) as repo:
        return repo.get_snapshot(sid)


def test_all_vms_one_dead_socket_one_without_agent(start_guest: StartGuest, tmp_path: Path, sock_dir: Path,
                                                   repo_env: dict[str, str]) -> None:
    qmp_dir = sock_dir / "qmp"
    qmp_dir.mkdir()
    data = tmp_path / "d.raw"
    data.write_bytes(b"")
    os.truncate(data, 16 * MiB)
    vm = start_guest([Disk("vda", make_disk(tmp_path / "a.raw", 32), "raw"), Disk("vdb", data, "raw")],
                     action="serve", agent=False,
                     extra_args=["-qmp", f"unix:{qmp_dir / 'alive.qmp'},server=on,wait=off"])
    dead = socket.socket(socket.AF_UNIX)  # a VM that is gone: the socket file stays, nobody listens
    dead.bind(str(qmp_dir / "gone.qmp"))
    dead.close()
    vm.wait_serial("IHBGUEST: READY", 120)
    p_rc, out = ihb_json(repo_env, "vm", "backup", "--all", "--qmp-dir", str(qmp_dir), "--parallel", "2", check=False)
    assert p_rc == 31, out
    res = {r["vm"]: r for r in out["results"]}
    assert sorted(res) == ["alive", "gone"] and not out["ok"]
    assert res["alive"]["ok"] and res["alive"]["consistency"] == "crash"
    assert not res["gone"]["ok"] and "cannot talk to QEMU" in res["gone"]["error"]
    snap = _load(repo_env, res["alive"]["id"])
    assert snap.meta["quiesce"]["agent"] is False and "no guest agent" in snap.meta["quiesce"]["note"]
    assert [d.name for d in snap.disks] == ["vda", "vdb"]
    _, listing = ihb_json(repo_env, "vm", "list")
    assert list(listing) == ["alive"]
    human = subprocess.run([sys.executable, "-m", "appliance.cli", "vm", "backup", "--all", "--qmp-dir", str(qmp_dir)],
                           env={**os.environ, **repo_env}, capture_output=True, text=True, timeout=300)
    assert human.returncode == 31
    assert "FAILED  gone" in human.stdout and "ok      alive" in human.stdout and "1 of 2 VMs" in human.stdout
