"""Instant recovery for real: a disk that boots by itself (MBR + extlinux) is backed up, booted from
the FUSE mount of the backup under QEMU, written to, killed, resumed with its writes, migrated live
to "production" storage, and the migrated disk boots alone. verify-boot records its verdict."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from repo.repository import Repository
from tests.guest.vm import GuestKernel, debugfs_cat, make_bootable_disk
from tests.util import ihb

BOOT_TIMEOUT = 240


def _boot_alone(disk: Path, fmt: str, serial: Path) -> str:
    """Boot a disk with nothing but QEMU and its own bootloader; return the console once it powers off
    or shows READY."""
    p = subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-display", "none", "-no-reboot",
                          "-serial", f"file:{serial}", "-drive", f"file={disk},format={fmt},if=virtio",
                          "-nic", "none"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + BOOT_TIMEOUT
    text = ""
    while time.monotonic() < deadline and p.poll() is None:
        text = serial.read_text(errors="replace") if serial.exists() else ""
        if "IHBGUEST: READY" in text:
            break
        time.sleep(0.3)
    if p.poll() is None:
        p.kill()
    p.wait()
    return serial.read_text(errors="replace") if serial.exists() else text


def test_instant_recover_migrate_and_verify(tmp_path: Path, guest_kernel: GuestKernel) -> None:
    disk = make_bootable_disk(tmp_path / "boot.raw", guest_kernel)
    first = _boot_alone(disk, "raw", tmp_path / "first.log")  # boot-once: writes the marker, powers off
    assert "MARKER-WRITTEN" in first, first[-2000:]
    marker = debugfs_cat(disk, "/marker.txt", offset=1048576)
    assert marker and "boot_id" in marker
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    subprocess.run(["debugfs", "-w", "-R", f"write {empty} ihb-stay", f"{disk}?offset=1048576"], check=True,
                   capture_output=True)
    repo = str(tmp_path / "repo")
    Repository.init(repo, b"pw", image_chunk_size=65536)
    env = {"IHB_REPO": repo, "IHB_PASSPHRASE": "pw", "IHB_DATA_DIR": str(tmp_path / "data")}
    ihb("backup-image", "--vm", "bootvm", "--disk", "vda", str(disk), env=env)
    wd = Path("/tmp") / f"ihb-ir-test-{os.getpid()}"
    shutil.rmtree(wd, ignore_errors=True)
    # The appliance is busy: another mount of the repository is open and a backup is running.
    other_mnt = tmp_path / "other-mnt"
    other_mnt.mkdir()
    ihb("mount", str(other_mnt), env=env)
    busy_src = tmp_path / "busy"
    busy_src.mkdir()
    for i in range(6):
        (busy_src / f"f{i}").write_bytes(os.urandom(16 << 20))
    busy = subprocess.Popen([sys.executable, "-m", "appliance.cli", "backup", str(busy_src)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        out = json.loads(ihb("instant-recover", "bootvm@latest", "--workdir", str(wd), "--no-network",
                             "--wait-serial", "IHBGUEST: READY", "--timeout", str(BOOT_TIMEOUT), "--json",
                             env=env, timeout=BOOT_TIMEOUT + 60).stdout)
        assert out["status"] == "running"
        assert busy.wait(300) == 0, busy.stderr.read() if busy.stderr else ""
        assert os.listdir(other_mnt / "vms" / "bootvm")  # the other mount kept serving
        ihb("umount", str(other_mnt), env=env)
        assert out["timings"]["running"] < 10, out["timings"]  # QEMU running from the backup in under 10 s
        serial = (wd / "serial.log").read_text(errors="replace")
        assert f"MARKER-FOUND {marker.strip()}" in serial  # it reads what was written before the backup
        assert "OVERLAY-WRITE-DONE" in serial
        # kill -9 QEMU (a crash): the overlay keeps the guest's writes; starting again reuses it
        os.kill(out["qemu_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{out['qemu_pid']}") and time.monotonic() < deadline:
            time.sleep(0.1)
        out = json.loads(ihb("instant-recover", "bootvm@latest", "--workdir", str(wd), "--no-network",
                             "--wait-serial", "IHBGUEST: READY", "--timeout", str(BOOT_TIMEOUT), "--json",
                             env=env, timeout=BOOT_TIMEOUT + 60).stdout)
        prod = tmp_path / "prod"
        mig = json.loads(ihb("instant-recover", "migrate", "--workdir", str(wd), "--to", str(prod), "--json",
                             env=env, timeout=600).stdout)
        assert mig["status"] == "migrated"
        assert not os.path.ismount(wd / "mnt")  # the VM no longer needs the backup
        ihb("instant-recover", "stop", "--workdir", str(wd), env=env)
    finally:
        if busy.poll() is None:
            busy.kill()
        subprocess.run(["fusermount3", "-uz", str(other_mnt)], capture_output=True)
        if (wd / "state.json").exists():
            ihb("instant-recover", "stop", "--workdir", str(wd), env=env, check=False)
        subprocess.run(["fusermount3", "-uz", str(wd / "mnt")], capture_output=True)
        shutil.rmtree(wd, ignore_errors=True)
    migrated = Path(mig["migrated_to"]["vda"])
    raw = tmp_path / "migrated.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(migrated), str(raw)], check=True)
    written = debugfs_cat(raw, "/instant-boot-write.txt", offset=1048576)
    assert written and "instant-boot session" in written  # writes made while recovered were kept
    assert debugfs_cat(disk, "/instant-boot-write.txt", offset=1048576) is None
    # the backup itself was never written
    restored = tmp_path / "restored.raw"
    ihb("restore-disk", "bootvm@latest", "vda", str(restored), env=env)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(restored), str(disk)], check=True)
    # the migrated disk boots alone, without the appliance
    alone = _boot_alone(migrated, "qcow2", tmp_path / "alone.log")
    assert "MARKER-FOUND" in alone, alone[-2000:]
    # verify-boot: boots, result recorded; an empty disk does not boot
    v = json.loads(ihb("verify-boot", "bootvm@latest", "--timeout", str(BOOT_TIMEOUT), "--json", env=env,
                       timeout=BOOT_TIMEOUT + 60).stdout)
    assert v["ok"] and v["verifications"] == 1
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(16 << 20)
    ihb("backup-image", "--vm", "blank", "--disk", "vda", str(blank), env=env)
    bad = ihb("verify-boot", "blank@latest", "--timeout", "20", "--json", env=env, check=False, timeout=200)
    assert bad.returncode == 47 and not json.loads(bad.stdout)["ok"]
    # both verdicts are also in the job state, where `ihb sla` reads them (with the measured restore-disk)
    state = tmp_path / "data" / "jobs"
    seen = [json.loads(ln) for ln in (state / "verifications.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["host"], r["ok"]) for r in seen] == [("verify-boot", "bootvm", True),
                                                                 ("verify-boot", "blank", False)]
    runs = [json.loads(ln) for ln in (state / "jobs.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "restore-disk" and r["host"] == "bootvm" and r["status"] == "ok" for r in runs)
