"""Instant recovery: boot a VM straight from a restore point, then move it to production storage live.

The restore point is never written. Each disk gets a qcow2 overlay on the appliance whose backing file
is the disk's raw image in the FUSE mount; the guest's writes go to the overlay, which is kept in a
work directory with a state file, so a crash of QEMU or of the appliance loses none of them: running
`instant-recover` again reuses the overlays. Migration is a QEMU block mirror of the whole chain to
the target, then a pivot; afterwards the VM needs neither the mount nor the appliance.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from repo.errors import IhbError, InvalidArgument
from repo.snapshot import Snapshot

from .qmp import GuestAgent, QMPClient, QMPError, qemu_accel

STATE = "state.json"


class RecoveryError(IhbError):
    """Instant recovery failed."""

    exit_code = 46


@dataclass
class Session:
    vm: str
    snapshot: str
    workdir: str
    mountpoint: str
    overlays: dict[str, str]
    qmp: str
    qga: str
    serial: str
    pidfile: str
    status: str = "starting"  # running | migrating | migrated | stopped
    migrated_to: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def save(self) -> None:
        tmp = os.path.join(self.workdir, STATE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.workdir, STATE))

    @classmethod
    def load(cls, workdir: str) -> Session:
        try:
            with open(os.path.join(workdir, STATE)) as f:
                return cls(**json.load(f))
        except FileNotFoundError:
            raise InvalidArgument(f"no instant recovery in {workdir}") from None

    def qemu_pid(self) -> int | None:
        """The pid of our QEMU if it is alive (not a zombie, not a reused pid)."""
        try:
            with open(self.pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (FileNotFoundError, ValueError, ProcessLookupError, IndexError):
            return None
        if state in ("Z", "X") or b"qemu" not in cmdline or self.pidfile.encode() not in cmdline:
            return None
        return pid


def machine_args(snap: Snapshot, memory_mb: int | None = None, cpus: int | None = None) -> list[str]:
    """QEMU settings recorded with the restore point (machine type, memory, CPUs), or small defaults."""
    q = snap.meta.get("qemu") or {}
    mem = memory_mb or int(q.get("memory_mb") or 512)
    ncpu = cpus or int(q.get("cpus") or 1)
    args = ["-m", str(mem), "-smp", str(ncpu)]
    machine = q.get("machine")
    if isinstance(machine, str) and re.fullmatch(r"[A-Za-z0-9._-]+", machine):
        args += ["-machine", machine]
    return args


def _qemu_cmd(session: Session, snap: Snapshot, disks: dict[str, str], *, network: bool,
              memory_mb: int | None, cpus: int | None) -> list[str]:
    cmd = ["qemu-system-x86_64", "-name", session.vm, "-accel", qemu_accel(), *machine_args(snap, memory_mb, cpus),
           "-display", "none", "-serial", f"file:{session.serial}",
           "-qmp", f"unix:{session.qmp},server=on,wait=off",
           "-chardev", f"socket,path={session.qga},server=on,wait=off,id=qga0",
           "-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
           "-daemonize", "-pidfile", session.pidfile]
    for i, (name, overlay) in enumerate(disks.items()):
        node = json.dumps({"node-name": name, "driver": "qcow2", "discard": "unmap",
                           "file": {"driver": "file", "filename": overlay}})
        cmd += ["-blockdev", node, "-device", f"virtio-blk-pci,drive={name},id={name},bootindex={i + 1}"]
    cmd += ["-nic", "user,model=virtio-net-pci"] if network else ["-nic", "none"]
    return cmd


def _wait_file(path: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RecoveryError(f"{what} did not appear within {timeout:.0f} s")
        time.sleep(0.02)


def start(snap: Snapshot, workdir: str, mountpoint: str, disk_path: Callable[[str], str], *, network: bool = True,
          memory_mb: int | None = None, cpus: int | None = None, wait_serial: str | None = None,
          wait_agent: bool = False, timeout: float = 120.0, t0: float | None = None) -> Session:
    """Boot the VM of ``snap`` from overlays on the mounted raw images; reuse overlays that exist."""
    t0 = t0 if t0 is not None else time.monotonic()
    os.makedirs(workdir, exist_ok=True)
    try:
        old = Session.load(workdir)
        if old.qemu_pid() is not None:
            raise RecoveryError(f"{old.vm} is already running from {workdir} (QEMU pid {old.qemu_pid()})")
        if old.snapshot != snap.id:
            raise RecoveryError(f"{workdir} holds the recovery of restore point {old.snapshot[:8]}, not {snap.short_id}")
    except InvalidArgument:
        pass
    overlays = {}
    for d in snap.disks:
        ov = os.path.join(workdir, f"{d.name}.overlay.qcow2")
        if not os.path.exists(ov):  # an existing overlay holds the guest's writes from before a crash
            base = disk_path(d.name)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", ov + ".tmp"],
                           check=True, capture_output=True)
            os.replace(ov + ".tmp", ov)
        overlays[d.name] = ov
    sock_dir = os.path.join("/tmp", f"ihb-ir-{os.getpid()}-{snap.short_id}")  # short path: UNIX socket limit
    os.makedirs(sock_dir, exist_ok=True)
    s = Session(vm=snap.vm or "vm", snapshot=snap.id, workdir=workdir, mountpoint=mountpoint, overlays=overlays,
                qmp=os.path.join(sock_dir, "qmp"), qga=os.path.join(sock_dir, "qga"),
                serial=os.path.join(workdir, "serial.log"), pidfile=os.path.join(workdir, "qemu.pid"))
    for p in (s.qmp, s.qga, s.pidfile):
        if os.path.exists(p):
            os.unlink(p)
    s.timings["overlays"] = round(time.monotonic() - t0, 3)
    p = subprocess.run(_qemu_cmd(s, snap, overlays, network=network, memory_mb=memory_mb, cpus=cpus),
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RecoveryError(f"QEMU did not start: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    with QMPClient(s.qmp).connect(timeout=30) as q:
        if q.execute("query-status")["status"] != "running":
            q.execute("cont")
    s.timings["running"] = round(time.monotonic() - t0, 3)
    s.status = "running"
    s.save()
    if wait_serial:
        deadline = time.monotonic() + timeout
        rx = re.compile(wait_serial)
        while True:
            try:
                with open(s.serial, errors="replace") as f:
                    if rx.search(f.read()):
                        break
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline or s.qemu_pid() is None:
                raise RecoveryError(f"no {wait_serial!r} on the serial console within {timeout:.0f} s")
            time.sleep(0.1)
        s.timings["serial"] = round(time.monotonic() - t0, 3)
    if wait_agent:
        with GuestAgent(s.qga).connect(timeout=timeout) as ga:
            ga.ping(timeout=timeout)
        s.timings["agent"] = round(time.monotonic() - t0, 3)
    s.save()
    return s


def migrate(s: Session, target_dir: str, *, fmt: str = "qcow2", timeout: float = 3600.0,
            progress: Callable[[str], None] | None = None) -> Session:
    """Mirror every disk (overlay + backing image from the backup) to ``target_dir`` while the VM runs,
    then pivot. Writes made during the copy are mirrored too. Restartable: a mirror that was interrupted
    is started again from the overlay, which still holds every write."""
    if s.qemu_pid() is None:
        raise RecoveryError(f"{s.vm} is not running; start it again with `ihb instant-recover` first")
    os.makedirs(target_dir, exist_ok=True)
    s.status = "migrating"
    s.save()
    with QMPClient(s.qmp).connect(timeout=30) as q:
        sizes = {b["device"] or b["qdev"]: b for b in q.execute("query-block")}
        targets = {}
        for name in s.overlays:
            info = next((b for k, b in sizes.items() if name in (k, b.get("qdev"), b.get("inserted", {}).get("node-name"))), None)
            size = info["inserted"]["image"]["virtual-size"] if info else None
            if size is None:
                raise RecoveryError(f"disk {name} not found in the running VM")
            path = os.path.join(target_dir, f"{s.vm}-{name}.{fmt}")
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, str(size)], check=True, capture_output=True)
            tnode = f"mig-{name}"
            try:
                q.execute("blockdev-del", **{"node-name": tnode})
            except QMPError:
                pass
            q.execute("blockdev-add", **{"node-name": tnode, "driver": fmt,
                                         "file": {"driver": "file", "filename": path}})
            q.execute("blockdev-mirror", **{"job-id": tnode, "device": name, "target": tnode, "sync": "full",
                                            "auto-dismiss": False})
            targets[name] = path
        ready: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(ready) < len(targets):
            ev = q.wait_event("BLOCK_JOB_READY", timeout=max(1.0, deadline - time.monotonic()))
            ready.add(ev["data"]["device"])
            if progress:
                progress(f"{ev['data']['device']} in sync")
        for name in targets:
            q.execute("block-job-complete", device=f"mig-{name}")
        done: set[str] = set()
        while len(done) < len(targets):
            ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=max(1.0, deadline - time.monotonic()))
            if ev["data"].get("error"):
                raise RecoveryError(f"mirror of {ev['data']['device']} failed: {ev['data']['error']}")
            done.add(ev["data"]["device"])
            q.execute("job-dismiss", id=ev["data"]["device"])
        for name in targets:
            # The device now uses mig-<name>; drop the overlay node and, with it, its backing file in the
            # mount, so the mount can go away.
            try:
                q.execute("blockdev-del", **{"node-name": name})
            except QMPError as e:
                raise RecoveryError(f"migrated, but the old overlay of {name} is still in use: {e}") from None
    s.migrated_to = targets
    s.status = "migrated"
    s.save()
    return s


def stop(s: Session, timeout: float = 30.0) -> None:
    pid = s.qemu_pid()
    if pid is not None:
        try:
            with QMPClient(s.qmp).connect(timeout=5) as q:
                q.execute("quit")
        except (OSError, QMPError, TimeoutError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while s.qemu_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if s.qemu_pid() is not None:
            os.kill(pid, signal.SIGKILL)
    s.status = "stopped" if s.status != "migrated" else s.status
    s.save()
    shutil.rmtree(os.path.dirname(s.qmp), ignore_errors=True)


def session_summary(s: Session) -> dict[str, Any]:
    return {**asdict(s), "qemu_pid": s.qemu_pid()}
