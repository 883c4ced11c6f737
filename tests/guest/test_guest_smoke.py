"""The test guest itself works: it boots under TCG, talks QMP and qemu-ga, and its writes reach disk.

Everything later VM tests rely on (marker/check boots, the agent's freeze/thaw/exec, persistent dirty
bitmaps, a self-booting disk) is exercised here once, so a broken guest fails in one obvious place.
Boot times are printed (``pytest -s``) and recorded as test properties.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.hypervisor.qmp import QMPClient, QMPError
from tests.guest.vm import Disk, GuestKernel, GuestVM, debugfs_cat, make_bootable_disk, make_disk

StartGuest = Callable[..., GuestVM]
RecordProperty = Callable[[str, Any], None]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def timed(record: RecordProperty, name: str, seconds: float) -> None:
    record(name, round(seconds, 2))
    print(f"\n{name}: {seconds:.2f}s")


def bitmap_count(qmp: QMPClient, node: str, name: str) -> int:
    for n in qmp.execute("query-named-block-nodes"):
        if n["node-name"] == node:
            for b in n.get("dirty-bitmaps", []):
                if b["name"] == name:
                    return int(b["count"])
    raise AssertionError(f"no bitmap {name} on node {node}")


def test_marker_boot_then_check_boot_from_overlay(
    start_guest: StartGuest, tmp_path: Path, record_property: RecordProperty
) -> None:
    disk = make_disk(tmp_path / "disk.raw", 64)
    vm = start_guest([("vda", disk, "raw")], action="marker", agent=False)
    assert vm.qmp.execute("query-status")["status"] == "running"
    boot_id = vm.wait_serial(r"IHBGUEST: MARKER-WRITTEN (\S+)", 120).group(1)
    assert vm.wait_exit(60) == 0
    timed(record_property, "marker_boot_to_exit", vm.elapsed())
    assert debugfs_cat(disk, "/marker.txt") == f"ihb marker boot_id={boot_id}\n"

    # instant-boot shape: a qcow2 overlay on the untouched base image takes the guest's writes
    base_sum = sha256(disk)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", disk, "-F", "raw", overlay], check=True)
    vm = start_guest([("vda", overlay, "qcow2")], action="check", agent=False)
    found = vm.wait_serial(r"IHBGUEST: MARKER-FOUND (.*)", 120).group(1)
    vm.wait_serial("IHBGUEST: OVERLAY-WRITE-DONE", 30)
    assert vm.wait_exit(60) == 0
    timed(record_property, "check_boot_to_exit", vm.elapsed())
    assert found.strip() == f"ihb marker boot_id={boot_id}"
    assert sha256(disk) == base_sum
    assert debugfs_cat(disk, "/instant-boot-write.txt") is None
    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", overlay, flat], check=True)
    assert (debugfs_cat(flat, "/instant-boot-write.txt") or "").startswith("written in instant-boot session")


def test_serve_agent_exec_freeze_thaw_fstrim(
    start_guest: StartGuest, tmp_path: Path, record_property: RecordProperty
) -> None:
    src = tmp_path / "src"
    (src / "home").mkdir(parents=True)
    (src / "home" / "seed.txt").write_text("seed\n")
    disk = make_disk(tmp_path / "disk.raw", 64, src)
    vm = start_guest([("vda", disk, "raw")], action="serve")
    vm.wait_serial("IHBGUEST: READY", 120)
    agent = vm.agent
    agent.ping(60)
    timed(record_property, "serve_boot_to_agent", vm.elapsed())

    assert agent.fsfreeze_status() == "thawed"
    r = agent.exec_command(
        ["/bin/sh", "-c", "cat /mnt/home/seed.txt && echo written-by-guest-exec > /mnt/x.txt && sync"],
        timeout=30,
    ).check()
    assert r.stdout == b"seed\n"
    assert agent.exec_command(["/bin/sh", "-c", "exit 3"]).exitcode == 3
    with pytest.raises(QMPError) as err:
        agent.execute("guest-no-such-command")
    assert err.value.cls == "CommandNotFound"

    assert agent.fsfreeze_freeze() == 1  # the ext4 on /mnt; the initramfs is not a block fs
    assert agent.fsfreeze_status() == "frozen"
    assert agent.fsfreeze_thaw() == 1
    assert agent.fsfreeze_status() == "thawed"
    paths = agent.fstrim()["paths"]
    assert [p["path"] for p in paths if "error" not in p] == ["/mnt"]
    agent.file_write("/mnt/y.txt", b"written-by-guest-file\n")
    assert agent.file_read("/mnt/x.txt") == b"written-by-guest-exec\n"

    # Freeze, then pull the plug with QMP quit: the freeze checkpointed the ext4 journal, so the
    # image reads back without journal replay, as a backup taken at this point would.
    assert agent.fsfreeze_freeze() == 1
    vm.stop()
    assert debugfs_cat(disk, "/x.txt") == "written-by-guest-exec\n"
    assert debugfs_cat(disk, "/y.txt") == "written-by-guest-file\n"


def test_persistent_dirty_bitmap_counts_guest_writes(
    start_guest: StartGuest, tmp_path: Path, record_property: RecordProperty
) -> None:
    raw = make_disk(tmp_path / "disk.raw", 64)
    qcow = tmp_path / "data.qcow2"  # persistent bitmaps live in qcow2 images, not raw ones
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow], check=True)
    vm = start_guest([Disk("data", qcow, "qcow2")], action="serve")
    vm.wait_serial("IHBGUEST: READY", 120)
    with pytest.raises(QMPError) as err:
        vm.qmp.execute("no-such-command")
    assert err.value.cls == "CommandNotFound"

    vm.qmp.execute("block-dirty-bitmap-add", node="data", name="cbt0", persistent=True, granularity=65536)
    before = bitmap_count(vm.qmp, "data", "cbt0")
    vm.agent.ping(60)
    vm.agent.exec_command(
        ["/bin/sh", "-c", "dd if=/dev/urandom of=/mnt/blob bs=64k count=32 2>/dev/null && sync"], timeout=60
    ).check()
    after = bitmap_count(vm.qmp, "data", "cbt0")
    assert after >= before + 2 * 1024 * 1024, (before, after)

    # system_powerdown: acpid in the guest unmounts and powers off; QEMU then stores the bitmap
    assert vm.powerdown(60) == 0
    assert vm.guest_lines()[-1].startswith("POWEROFF")
    timed(record_property, "serve_boot_to_powerdown", vm.elapsed())
    info = json.loads(
        subprocess.run(["qemu-img", "info", "--output=json", qcow], check=True, capture_output=True).stdout
    )
    bitmaps = info["format-specific"]["data"].get("bitmaps", [])
    assert [b["name"] for b in bitmaps] == ["cbt0"]


@pytest.mark.slow  # two BIOS + extlinux boots of the bzImage: ~13 s of the file's ~35 s
def test_bootable_disk_first_boot_marker_then_check(
    start_guest: StartGuest, guest_kernel: GuestKernel, tmp_path: Path, record_property: RecordProperty
) -> None:
    if os.geteuid() != 0:
        pytest.fail("make_bootable_disk.sh needs root (losetup + mount for extlinux --install)")
    disk = make_bootable_disk(tmp_path / "boot.raw", guest_kernel)
    vm = start_guest([("vda", disk, "raw")], kernel=None, agent=False)
    boot_id = vm.wait_serial(r"IHBGUEST: MARKER-WRITTEN (\S+)", 180).group(1)
    assert vm.wait_exit(60) == 0
    timed(record_property, "bootable_disk_first_boot", vm.elapsed())

    vm = start_guest([("vda", disk, "raw")], kernel=None, agent=False)
    found = vm.wait_serial(r"IHBGUEST: MARKER-FOUND (.*)", 180).group(1)
    vm.wait_serial("IHBGUEST: OVERLAY-WRITE-DONE", 30)
    assert vm.wait_exit(60) == 0
    timed(record_property, "bootable_disk_second_boot", vm.elapsed())
    assert found.strip() == f"ihb marker boot_id={boot_id}"
