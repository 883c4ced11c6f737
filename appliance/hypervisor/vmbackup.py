"""Image backups of running QEMU/KVM VMs over QMP: fleecing, changed-block tracking, NBD pull.

Why this shape (see docs of QEMU's "incremental backup" and the recipes this project verified):

* **One point in time for all disks.** A qcow2 *fleece* overlay (backing = the live disk node) and a
  ``blockdev-backup sync=none`` job into it freeze the disk's content as of the job start: every guest
  write first copies the old block into the fleece. The jobs of all disks start in ONE QMP
  ``transaction``, together with the dirty-bitmap rotation, so every disk and every bitmap share the
  same instant. The guest agent freezes the file systems only around that transaction (tens of ms).
* **Pull, not push.** QEMU exports the fleece nodes over its NBD server; we read what we need with our
  own client: ``base:allocation`` tells holes and zeros apart from data, ``qemu:dirty-bitmap:NAME``
  tells which blocks changed since the previous restore point. The bytes go straight into the
  repository's fixed-chunk maps (``repo.image``), an incremental on top of the previous map.
* **Bitmaps are rotated, never trusted blindly.** Per disk a bitmap ``ihb-<repo>-<generation>``
  records the writes since the restore point of that generation. A backup adds generation g+1 and
  disables g in the transaction, so g holds exactly the changes between the two points in time.
  An incremental is taken only when the restore point of generation g exists in *this* repository
  and the bitmap is consistent; otherwise the disk is copied in full. On failure or cancel the new
  bitmap is merged back into g (nothing is lost); after a hard kill, the next run merges every newer
  leftover into g before it starts. Raw (non-qcow2) disks get non-persistent bitmaps: they survive
  as long as the QEMU process, after which the next backup is a full one.
* **Blocks the guest does not use are not read.** guest-fstrim (when an agent answers) turns deleted
  files into holes first; then the guest file systems' own allocation bitmaps
  (:func:`repo.guestfs.find_free_extents`: ext2/3/4, FAT, XFS and NTFS) mark more blocks as free even
  when they were never discarded. Both are read from the fleece, i.e. at the same point in time as the
  data. XFS is evaluated when its log is clean or holds only superblock updates (a frozen guest);
  NTFS only when its $LogFile is clean (a shut-down guest); ext4 journals that need recovery are
  scanned for newer bitmaps instead.

Everything QEMU-side that a run creates (fleece nodes and jobs, exports, the NBD server) carries an
``ihb-`` prefix and is removed in ``finally``; a run killed with SIGKILL leaves them behind, and the
next run for that VM removes them first (:meth:`QemuVM.cleanup_leftovers`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3

from appliance.config import data_dir
from repo import format as fmt
from repo.errors import IhbError, SourceError
from repo.image import ImageReader, ImageWriter
from repo.image_catalog import index_image_snapshot_quietly
from repo.repository import BlobWriter, Repository
from repo.snapshot import DiskRecord, Snapshot
from repo.workers import Pipeline

from .image_backup import subtract, write_runs
from .nbd import NBDClient, NBDError
from .qmp import GuestAgent, QMPClient, QMPConnectionError, QMPError
from .sources import NBDSource

log = logging.getLogger(__name__)

#: Dirty-bitmap granularity. qcow2's default cluster size: a finer one costs memory in QEMU, a coarser
#: one makes incrementals read more than was written.
BITMAP_GRANULARITY = 64 * 1024

#: Prefix of every QEMU object (node, job, export) a backup run creates.
OBJ_PREFIX = "ihb-"
FLEECE_PREFIX = "ihb-fleece-"
#: Test-only: stop reading (and wait for a signal) after this many bytes, so a test can kill the
#: process at a known point of the pull. Never set in production.
STALL_ENV = "IHB_TESTONLY_VM_STALL_AFTER"
STALL_MARKER = "IHB-TESTONLY-STALLED"

ProgressFn = Callable[[dict[str, Any], str], None]


def vm_chunk_size(repo: Repository) -> int:
    """Chunk size of a VM disk's full backup (its incrementals keep it): no larger than the bitmap
    granularity, so that an incremental stores exactly the dirty blocks. With 256 KiB chunks every
    scattered 64 KiB change re-read, re-hashed, re-compressed and re-stored a whole chunk: 1% of a 10 GiB
    disk changed cost 424 MB of chunk work for 102 MiB of change (bench/vm_bench.py: inside ihb
    1.25 -> 0.66 s, stored 162 -> 105 MiB); the full backup reads through QEMU's NBD export at the same
    speed either way."""
    return min(repo.config.image_chunk_size, BITMAP_GRANULARITY)


class VMBackupError(SourceError):
    """A running VM could not be backed up (QEMU, the guest agent or the NBD pull failed)."""


class Cancelled(VMBackupError):
    """The backup was cancelled; the dirty bitmaps were merged back, nothing is lost."""


# === bitmap naming and planning (pure) ================================================================


def bitmap_prefix(repo_id: str) -> str:
    """Bitmaps are per repository: two repositories backing up one VM must not rotate each other's."""
    return f"{OBJ_PREFIX}{repo_id[:8]}-"


def bitmap_name(prefix: str, generation: int) -> str:
    return f"{prefix}{generation}"


def parse_generation(prefix: str, name: str) -> int | None:
    if not name.startswith(prefix):
        return None
    tail = name[len(prefix):]
    return int(tail) if tail.isdigit() else None


@dataclass(frozen=True)
class BitmapInfo:
    """One dirty bitmap on a disk node, as query-named-block-nodes reports it."""

    name: str
    count: int
    recording: bool
    persistent: bool
    busy: bool = False
    inconsistent: bool = False
    granularity: int = BITMAP_GRANULARITY


@dataclass
class DiskPlan:
    """What one backup does with one disk's bitmaps; computed before QEMU is touched."""

    disk: str
    mode: str  # "full" | "incremental"
    reason: str
    base_snapshot: Snapshot | None = None  # restore point whose generation ``base_bitmap`` tracks from
    base_bitmap: str | None = None  # disabled in the transaction; exported; removed on success
    merge: list[str] = field(default_factory=list)  # newer leftovers merged into base_bitmap first
    remove: list[str] = field(default_factory=list)  # stale bitmaps to remove before the transaction

    @property
    def base_record(self) -> DiskRecord | None:
        if self.base_snapshot is None:
            return None
        return next((d for d in self.base_snapshot.disks if d.name == self.disk), None)


def plan_disk(disk: str, size: int, bitmaps: Sequence[BitmapInfo], restore_points: Sequence[Snapshot],
              prefix: str, *, full: bool = False) -> DiskPlan:
    """Decide full or incremental for one disk, and what to do with the bitmaps found on it.

    ``restore_points`` are this VM's restore points in the repository. The base is the newest
    generation that has both a consistent bitmap on the node and a restore point holding this disk
    at the same size. Bitmaps of newer generations are leftovers of runs that failed after their
    transaction (their changes happened after the base's point in time): they are merged into the
    base, never dropped. Older ones and unusable ones are removed. ``full`` forces a full copy but
    keeps the base bitmap, so a failed full backup does not cost the next incremental.
    """
    by_gen: dict[int, BitmapInfo] = {}
    remove: list[str] = []
    for b in bitmaps:
        g = parse_generation(prefix, b.name)
        if g is None:
            continue  # not ours: never touched
        if b.inconsistent:
            remove.append(b.name)  # QEMU died with it in use: it may miss writes
        else:
            by_gen[g] = b
    rp_by_gen: dict[int, Snapshot] = {}
    for s in restore_points:
        g = (s.meta.get("cbt") or {}).get("generation")
        if isinstance(g, int) and (s.meta.get("cbt") or {}).get("prefix") == prefix:
            rec = next((d for d in s.disks if d.name == disk), None)
            if rec is not None and rec.size == size and disk in (s.meta.get("cbt") or {}).get("bitmaps", {}):
                rp_by_gen[g] = s
    usable = sorted(g for g in by_gen if g in rp_by_gen)
    if not usable:
        why = "no bitmap" if not by_gen else "no restore point in this repository matches the bitmaps"
        if not restore_points:
            why = "first backup of this VM"
        return DiskPlan(disk, "full", why, remove=remove + [by_gen[g].name for g in sorted(by_gen)])
    base = usable[-1]
    merge = [by_gen[g].name for g in sorted(by_gen) if g > base]
    remove += [by_gen[g].name for g in sorted(by_gen) if g < base]
    plan = DiskPlan(disk, "full" if full else "incremental", "--full requested" if full else f"generation {base}",
                    base_snapshot=rp_by_gen[base], base_bitmap=by_gen[base].name, merge=merge, remove=remove)
    return plan


# === runs arithmetic (pure) =========================================================================


def clip_runs(dirty: Iterable[tuple[int, int]], alloc: Iterable[tuple[int, int, bool]]) -> Iterator[tuple[int, int, bool]]:
    """Restrict allocation runs ``(off, len, has_data)`` to the dirty extents (both sorted).

    A dirty block that now reads as zeros (discarded, trimmed) becomes a zero run: not read.
    """
    alloc_it = iter(alloc)
    cur = next(alloc_it, None)
    for off, ln in dirty:
        end = off + ln
        pos = off
        while pos < end:
            while cur is not None and cur[0] + cur[1] <= pos:
                cur = next(alloc_it, None)
            if cur is None:
                yield pos, end - pos, True  # beyond the map: read it, to be safe
                break
            a_off, a_len, has = cur
            if a_off > pos:
                n = min(a_off, end) - pos
                yield pos, n, True
                pos += n
                continue
            n = min(a_off + a_len, end) - pos
            yield pos, n, has
            pos += n


def merge_runs(runs: Iterable[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for off, ln, has in runs:
        if ln <= 0:
            continue
        if out and out[-1][2] == has and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + ln, has)
        else:
            out.append((off, ln, has))
    return out


# === QEMU side =========================================================================================


@dataclass(frozen=True)
class VMDisk:
    """A writable disk of the VM: the BlockBackend's root node and what it looks like to the guest."""

    name: str
    node: str
    driver: str
    size: int
    filename: str
    qdev: str
    device_type: str

    @property
    def persistent_bitmaps(self) -> bool:
        """Only qcow2 stores bitmaps; on other formats they live as long as the QEMU process."""
        return self.driver == "qcow2"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "node": self.node, "format": self.driver,
                "file": self.filename, "device": self.device_type, "qdev": self.qdev,
                "persistent_bitmaps": self.persistent_bitmaps}


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _safe(name: str) -> str:
    """A name usable in QEMU ids and file names (QEMU ids: letters, digits, '-', '.', '_')."""
    s = _SAFE.sub("_", name)
    return s if s and s[0].isalpha() else f"d{s}"


class QemuVM:
    """The QMP operations a backup needs, on one connected :class:`QMPClient`."""

    def __init__(self, qmp: QMPClient) -> None:
        self.qmp = qmp

    def q(self, command: str, **args: Any) -> Any:
        return self.qmp.execute(command, **args)

    def status(self) -> str:
        return str(self.q("query-status")["status"])

    # -- discovery -----------------------------------------------------------------------------------
    def disks(self) -> list[VMDisk]:
        out: list[VMDisk] = []
        used: set[str] = set()
        for i, b in enumerate(self.q("query-block")):
            ins = b.get("inserted")
            if not ins or ins.get("ro") or b.get("removable"):
                continue  # empty drives, CD-ROMs, read-only media: nothing the guest can change
            qdev = str(b.get("qdev") or "")
            dev_path = qdev[: -len("/virtio-backend")] if qdev.endswith("/virtio-backend") else qdev
            m = re.match(r"^/machine/peripheral/([^/]+)$", dev_path)
            node = str(ins["node-name"])
            if m:
                name = m.group(1)
            elif b.get("device"):
                name = str(b["device"])
            elif not node.startswith("#"):
                name = node
            else:
                name = f"disk{i}"
            while name in used:
                name += "_"
            used.add(name)
            dev_type = ""
            if dev_path.startswith("/"):
                try:
                    dev_type = str(self.q("qom-get", path=dev_path, property="type"))
                except QMPError:
                    pass
            out.append(VMDisk(name=name, node=node, driver=str(ins.get("drv", "")),
                              size=int(ins["image"]["virtual-size"]), filename=str(ins.get("file", "")),
                              qdev=qdev, device_type=dev_type))
        return out

    def bitmaps(self) -> dict[str, list[BitmapInfo]]:
        out: dict[str, list[BitmapInfo]] = {}
        for n in self.q("query-named-block-nodes", flat=True):
            out[n["node-name"]] = [
                BitmapInfo(name=b["name"], count=int(b.get("count", 0)), recording=bool(b.get("recording")),
                           persistent=bool(b.get("persistent")), busy=bool(b.get("busy")),
                           inconsistent=bool(b.get("inconsistent")),
                           granularity=int(b.get("granularity", BITMAP_GRANULARITY)))
                for b in n.get("dirty-bitmaps") or []
                if b.get("name")  # anonymous ones belong to block jobs (copy-before-write)
            ]
        return out

    def _devices(self) -> Iterator[tuple[str, str]]:
        """(qom path, type) of every user-created device."""
        for parent in ("/machine/peripheral", "/machine/peripheral-anon"):
            try:
                children = self.q("qom-list", path=parent)
            except QMPError:
                continue
            for c in children:
                t = str(c.get("type", ""))
                if t.startswith("child<"):
                    yield f"{parent}/{c['name']}", t[6:-1]

    def agent_socket(self) -> str | None:
        """The host end of the guest agent's virtio-serial port, if it is a UNIX socket."""
        label = None
        for path, typ in self._devices():
            if typ != "virtserialport":
                continue
            try:
                if self.q("qom-get", path=path, property="name") == "org.qemu.guest_agent.0":
                    label = str(self.q("qom-get", path=path, property="chardev"))
                    break
            except QMPError:
                continue
        if not label:
            return None
        for ch in self.q("query-chardev"):
            if ch.get("label") == label:
                m = re.search(r"unix:([^,]+)", str(ch.get("filename", "")))
                return m.group(1) if m else None
        return None

    def machine_info(self, disks: Sequence[VMDisk]) -> dict[str, Any]:
        """QEMU's view of the VM: enough to recreate it (machine type, memory, CPUs, NICs, disks).

        Each query is best effort: an older QEMU lacking one still gets a restore point.
        """
        info: dict[str, Any] = {}

        def get(cmd: str, **kw: Any) -> Any:
            try:
                return self.q(cmd, **kw)
            except QMPError as e:
                log.debug("%s: %s", cmd, e)
                return None

        v = get("query-version")
        if v:
            info["version"] = "{major}.{minor}.{micro}".format(**v["qemu"])
            info["package"] = v.get("package", "")
        n = get("query-name")
        if n and n.get("name"):
            info["name"] = n["name"]
        u = get("query-uuid")
        if u and u.get("UUID") and set(u["UUID"]) != {"0", "-"}:
            info["uuid"] = u["UUID"]
        mt = get("qom-get", path="/machine", property="type")
        if isinstance(mt, str):
            info["machine"] = mt.removesuffix("-machine")
        kvm = get("query-kvm")
        if kvm is not None:
            info["accel"] = "kvm" if kvm.get("enabled") else "tcg"
        mem = get("query-memory-size-summary")
        if mem:
            info["memory_bytes"] = int(mem.get("base-memory", 0)) + int(mem.get("plugged-memory", 0))
        cpus = get("query-cpus-fast")
        if cpus:
            model = get("qom-get", path=cpus[0]["qom-path"], property="type")
            info["cpus"] = {
                "count": len(cpus),
                "model": str(model).split("-")[0] if isinstance(model, str) else None,
                "arch": cpus[0].get("target"),
                "topology": [c.get("props", {}) for c in cpus],
            }
        nics = []
        for path, typ in self._devices():
            try:
                props = {p["name"] for p in self.q("qom-list", path=path)}
                if "mac" not in props or "netdev" not in props:
                    continue
                nics.append({"id": path.rsplit("/", 1)[-1] if "peripheral-anon" not in path else None,
                             "model": typ, "mac": self.q("qom-get", path=path, property="mac"),
                             "netdev": self.q("qom-get", path=path, property="netdev")})
            except QMPError:
                continue
        info["nics"] = nics
        info["disks"] = [d.describe() for d in disks]
        return info

    # -- QEMU objects of a backup run ----------------------------------------------------------------
    def exports(self) -> list[dict[str, Any]]:
        try:
            return list(self.q("query-block-exports"))
        except QMPError:
            return []

    def del_export(self, export_id: str) -> None:
        try:
            self.q("block-export-del", id=export_id)
        except QMPError as e:
            if "not found" in e.desc.lower() or "no export" in e.desc.lower():
                return
            self.q("block-export-del", id=export_id, mode="hard")
        self.qmp.wait_event("BLOCK_EXPORT_DELETED", timeout=30, match=lambda ev: ev["data"].get("id") == export_id)

    def start_nbd_server(self, sock: str) -> None:
        """QEMU has one NBD server. One without exports is a leftover (ours, killed between start and
        export): replace it. One exporting something else belongs to another tool: leave it alone."""
        try:
            self.q("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        except QMPError as e:
            if "already" not in e.desc.lower():
                raise
            others = [str(x.get("id")) for x in self.exports()]
            if others:
                raise VMBackupError(f"QEMU's NBD server is in use by another tool (exports {', '.join(others)}); "
                                    "retry when that backup has finished") from None
            self.stop_nbd_server()
            self.q("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})

    def stop_nbd_server(self) -> None:
        try:
            self.q("nbd-server-stop")
        except QMPError:
            pass  # not running

    def cancel_job(self, job_id: str) -> None:
        jobs = {j["device"]: j for j in self.q("query-block-jobs")}
        if job_id not in jobs:
            return
        self.q("block-job-cancel", device=job_id, force=True)
        self.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=60, match=lambda ev: ev["data"].get("device") == job_id)

    def job_alive(self, job_id: str) -> bool:
        for j in self.q("query-block-jobs"):
            if j["device"] == job_id:
                return j.get("status") not in ("aborting", "concluded", "null") and not j.get("error")
        return False

    def del_node(self, node: str) -> None:
        try:
            self.q("blockdev-del", **{"node-name": node})
        except QMPError as e:
            if "not found" not in e.desc.lower() and "cannot find" not in e.desc.lower():
                raise

    def run_job(self, job_id: str, command: str, timeout: float = 120, **args: Any) -> None:
        """Start a job (``blockdev-create``) and wait until it concludes; raise its error."""
        self.q(command, **{"job-id": job_id, **args})
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            job = next((j for j in self.q("query-jobs") if j["id"] == job_id), None)
            if job is None or job["status"] == "concluded":
                break
            if time.monotonic() > deadline:
                raise VMBackupError(f"QEMU job {job_id} did not finish in {timeout:.0f} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        if job is not None:
            self.q("job-dismiss", id=job_id)
            if job.get("error"):
                raise VMBackupError(f"{command} ({job_id}): {job['error']}")

    def create_fleece(self, node: str, backing: str, path: str, size: int) -> None:
        """A fresh qcow2 overlay over ``backing``, created by QEMU itself (blockdev-create): no qemu-img
        process per disk, and the file belongs to QEMU's user, who must write to it anyway."""
        self.run_job(f"{node}-mkfile", "blockdev-create", options={"driver": "file", "filename": path, "size": 0})
        self.q("blockdev-add", **{"node-name": f"{node}-file", "driver": "file", "filename": path})
        self.run_job(f"{node}-mkqcow2", "blockdev-create",
                     options={"driver": "qcow2", "file": f"{node}-file", "size": size})
        self.q("blockdev-add", **{"node-name": node, "driver": "qcow2", "file": f"{node}-file", "backing": backing})

    def cleanup_leftovers(self) -> list[str]:
        """Remove what a killed run left in QEMU: exports, the NBD server, fleece jobs and nodes."""
        done: list[str] = []
        exports = self.exports()
        ours = [e for e in exports if str(e.get("id", "")).startswith(OBJ_PREFIX)]
        for e in ours:
            self.del_export(str(e["id"]))
            done.append(f"export {e['id']}")
        if ours and len(ours) == len(exports):
            self.stop_nbd_server()
            done.append("nbd server")
        for j in self.q("query-block-jobs"):
            if str(j["device"]).startswith(FLEECE_PREFIX):
                self.cancel_job(str(j["device"]))
                done.append(f"job {j['device']}")
        for j in self.q("query-jobs"):
            if str(j["id"]).startswith(FLEECE_PREFIX) and j["status"] == "concluded":
                self.q("job-dismiss", id=j["id"])
        nodes = [str(n["node-name"]) for n in self.q("query-named-block-nodes", flat=True)
                 if str(n["node-name"]).startswith(FLEECE_PREFIX)]
        for n in sorted(nodes, key=lambda n: n.endswith("-file")):  # the qcow2 node before its file node
            self.del_node(n)
            done.append(f"node {n}")
        return done


# === sources on the fleece export ====================================================================


class NBDByteSource:
    """``repo.guestfs.ByteSource`` over an NBD export (own connection, serialised): the free-space
    scanner reads guest file-system metadata at the backup's point in time."""

    def __init__(self, sock: str, export: str) -> None:
        self.client = NBDClient(unix=sock, export=export)
        self.size = self.client.size
        self.read_bytes = 0
        self._lock = threading.Lock()

    def read_at(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        with self._lock:
            self.read_bytes += size
            return self.client.pread(offset, size)

    def close(self) -> None:
        self.client.close()


def guest_free_extents(sock: str, export: str) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    """Byte extents the guest file systems mark free (never guesses: unknown = used)."""
    try:
        from repo.guestfs import find_free_extents
    except ImportError as e:  # pragma: no cover - guestfs is part of the tree
        return [], {"error": f"guest file-system reader unavailable: {e}"}
    src = NBDByteSource(sock, export)
    t0 = time.monotonic()
    try:
        fm = find_free_extents(src)
    except Exception as e:  # a damaged or unknown layout must never fail the backup: read everything
        log.warning("disk %s: free-space map failed, reading all allocated blocks: %s", export, e)
        return [], {"error": str(e), "metadata_read_bytes": src.read_bytes}
    finally:
        src.close()
    info = {
        "free_bytes": fm.free_bytes,
        "metadata_read_bytes": src.read_bytes,
        "seconds": round(time.monotonic() - t0, 3),
        "volumes": [{"index": v.index, "scheme": v.scheme, "fs": v.fs, "free_bytes": v.free_bytes,
                     **({"note": v.note} if v.note else {})} for v in fm.volumes],
    }
    return fm.extents, info


# === the copy =========================================================================================


def _stall_after() -> int | None:
    v = os.environ.get(STALL_ENV)
    return int(v) if v and v.isdigit() else None


def _stall(what: str) -> None:
    """Test-only: announce the point reached, then wait for the test's signal (sleep lets Python run
    signal handlers)."""
    sys.stderr.write(f"{STALL_MARKER} {what}\n")
    sys.stderr.flush()
    while True:
        time.sleep(0.05)


def partial_chunks(runs: Sequence[tuple[int, int, bool]], chunk_size: int, size: int) -> list[int]:
    """Indices of the chunks that ``runs`` cover only in part: those need the base chunk's bytes."""
    cover: dict[int, int] = {}
    for off, ln, _has in runs:
        first, last = off // chunk_size, (off + ln - 1) // chunk_size
        for idx in {first, last}:
            lo, hi = max(off, idx * chunk_size), min(off + ln, (idx + 1) * chunk_size)
            cover[idx] = cover.get(idx, 0) + hi - lo
    return sorted(i for i, n in cover.items() if n < min(chunk_size, size - i * chunk_size))


class _BasePrefetch:
    """The repository as ImageWriter sees it, with the base chunks of partially changed blocks read
    ahead on a few threads. An incremental of scattered small writes otherwise waits for one
    repository read (pack read + decrypt + decompress) per changed block, one after the other."""

    def __init__(self, repo: Repository, ids: list[bytes], window: int = 32) -> None:
        self._repo = repo
        self._ids = iter(ids)
        self._queue: list[tuple[bytes, concurrent.futures.Future[bytes]]] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="ihb-base")
        self._window = window
        self._fill()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._repo, name)

    def _fill(self) -> None:
        while len(self._queue) < self._window:
            cid = next(self._ids, None)
            if cid is None:
                return
            self._queue.append((cid, self._pool.submit(self._repo.get_blob, fmt.BlobKind.DATA, cid)))

    def get_blob(self, kind: int, blob_id: bytes) -> bytes:
        if kind == fmt.BlobKind.DATA:
            for i, (cid, fut) in enumerate(self._queue):
                if cid == blob_id:
                    del self._queue[: i + 1]  # earlier ones were not needed after all (dedup'd ids)
                    self._fill()
                    return fut.result()
        return self._repo.get_blob(kind, blob_id)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def copy_runs(repo: Repository, writer: BlobWriter, pipe: Pipeline, source: NBDSource, name: str, size: int,
              runs: list[tuple[int, int, bool]], base: DiskRecord | None, *, progress: ProgressFn | None = None,
              cancel: threading.Event | None = None, chunk_size: int | None = None) -> DiskRecord:
    """Write ``runs`` (data: read from ``source``; zero: recorded as holes) over ``base``'s map."""
    prefetch: _BasePrefetch | None = None
    if base is not None:
        reader = ImageReader(repo, base)
        ids = [cid for i in partial_chunks(runs, base.chunk_size, size)
               if i * base.chunk_size < base.size and (cid := reader.entry(i)) is not None]
        prefetch = _BasePrefetch(repo, ids)
    try:
        return _copy(prefetch or repo, writer, pipe, source, name, size, runs, base, progress, cancel, chunk_size)
    finally:
        if prefetch is not None:
            prefetch.close()


def _copy(repo: Any, writer: BlobWriter, pipe: Pipeline, source: NBDSource, name: str, size: int,
          runs: list[tuple[int, int, bool]], base: DiskRecord | None, progress: ProgressFn | None,
          cancel: threading.Event | None, chunk_size: int | None) -> DiskRecord:
    iw = ImageWriter(repo, writer, pipe, name, size, base=base, chunk_size=None if base is not None else chunk_size)
    stall = _stall_after()

    def check(read_bytes: int) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"backup of disk {name} cancelled")
        if stall is not None and read_bytes >= stall:
            _stall(f"{name} {read_bytes}")

    read_bytes, zero_bytes = write_runs(iw, source, runs, writer, name, progress, check)
    rec = iw.finish()
    rec.stats.update({"read_bytes": read_bytes, "zero_bytes": zero_bytes})
    return rec


# === one VM ===========================================================================================


@dataclass
class VMBackupOptions:
    full: bool = False
    agent_socket: str | None = None
    use_agent: bool = True
    agent_timeout: float = 5.0
    trim: bool = True
    skip_free: bool = True
    disks: Sequence[str] = ()
    scratch_dir: str | None = None
    tags: Sequence[str] = ()
    qmp_timeout: float = 60.0
    app_consistent: bool = False
    tenant: str = ""  # recorded in the restore point (meta.tenant) when set


@dataclass
class VMBackupResult:
    vm: str
    snapshot: Snapshot
    disks: list[DiskRecord]
    stats: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {"vm": self.vm, "ok": True, **self.snapshot.summary(),
                "disk_stats": {d.name: d.stats for d in self.disks}, "run": self.stats}


class _VMLock:
    """One backup per VM at a time on this appliance: two runs would rotate each other's bitmaps."""

    def __init__(self, vm: str) -> None:
        d = os.path.join(data_dir(), "vm-locks")
        os.makedirs(d, mode=0o700, exist_ok=True)
        # blake3, already loaded for chunk ids: hashlib would load OpenSSL's libcrypto at every start
        path = os.path.join(d, blake3.blake3(vm.encode()).hexdigest()[:32] + ".lock")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise VMBackupError(f"another ihb process is backing up VM {vm}; wait for it to finish") from None

    def release(self) -> None:
        os.close(self.fd)


class _Quiesce:
    """Guest agent around the transaction: trim before, freeze as briefly as possible, thaw always."""

    def __init__(self, vm: str, socket_path: str | None, opts: VMBackupOptions, running: bool) -> None:
        self.vm = vm
        self.agent: GuestAgent | None = None
        self.info: dict[str, Any] = {"agent": False}
        self.frozen = 0
        if not opts.use_agent:
            self.info["note"] = "agent not used (--no-agent)"
            return
        if not running:
            self.info["note"] = "VM not running: no agent can answer"
            return
        if socket_path is None:
            self.info["note"] = "no guest agent channel"
            return
        agent = GuestAgent(socket_path, timeout=max(opts.agent_timeout, 5.0))
        try:
            agent.connect(timeout=opts.agent_timeout)
            agent.ping(timeout=opts.agent_timeout)
        except (TimeoutError, QMPConnectionError, QMPError, OSError) as e:
            agent.close()
            self.info["note"] = f"guest agent did not answer: {e}"
            return
        self.agent = agent
        self.info["agent"] = True
        try:
            self.info["os"] = agent.execute("guest-get-osinfo").get("id")
        except (QMPError, TimeoutError, QMPConnectionError):
            pass
        try:
            if agent.fsfreeze_status() == "frozen":  # a killed earlier run left it frozen
                log.warning("VM %s: guest file systems were left frozen; thawing them", vm)
                agent.fsfreeze_thaw()
        except (QMPError, TimeoutError, QMPConnectionError) as e:
            log.warning("VM %s: fsfreeze status: %s", vm, e)
        if opts.trim:
            t0 = time.monotonic()
            try:
                r = agent.fstrim(timeout=600)
                paths = r.get("paths", []) if isinstance(r, dict) else []
                self.info["fstrim"] = {"seconds": round(time.monotonic() - t0, 3),
                                       "paths": [p.get("path") for p in paths if "error" not in p],
                                       "errors": [f"{p.get('path')}: {p['error']}" for p in paths if "error" in p]}
            except (QMPError, TimeoutError, QMPConnectionError) as e:
                self.info["fstrim"] = {"error": str(e)}

    def freeze(self) -> None:
        if self.agent is None:
            return
        self._guard = _start_thaw_guard(self.agent.path)
        self._t0 = time.monotonic()
        try:
            self.frozen = self.agent.fsfreeze_freeze(timeout=60)
        except (QMPError, TimeoutError, QMPConnectionError) as e:
            self.info["freeze_error"] = str(e)
            log.warning("VM %s: fsfreeze failed (%s); the backup is crash-consistent", self.vm, e)
            self.thaw()  # a partial freeze must not stay
            self.frozen = 0
            return
        if os.environ.get(STALL_ENV) == "frozen":
            _stall("frozen")

    def thaw(self) -> None:
        if self.agent is None:
            return
        last: Exception | None = None
        for _ in range(5):
            try:
                self.agent.fsfreeze_thaw(timeout=30)
                if hasattr(self, "_t0") and "freeze_seconds" not in self.info:
                    self.info["freeze_seconds"] = round(time.monotonic() - self._t0, 4)
                return
            except (QMPError, TimeoutError, QMPConnectionError) as e:
                last = e
                time.sleep(0.2)
        log.error("VM %s: cannot thaw the guest file systems (the guard process retries): %s", self.vm, last)
        self.info["thaw_error"] = str(last)

    def consistency(self, app_hooks: bool) -> str:
        if self.frozen <= 0:
            return "crash"
        if self.info.get("os") == "mswindows" or app_hooks:
            return "application"  # VSS writers (Windows) or the guest's fsfreeze hooks
        return "filesystem"

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        guard = getattr(self, "_guard", None)
        if guard is not None:
            _stop_thaw_guard(guard, thawed="thaw_error" not in self.info)
            self._guard = None


#: Runs beside a backup while the guest may be frozen. It waits for EOF on stdin: "done" means the
#: backup thawed the guest itself; anything else means it died (SIGKILL, OOM) between freeze and thaw,
#: so the guard thaws (the agent serves one client; the dead process's connection is gone by then).
_THAW_GUARD = r"""
import sys, time
from appliance.hypervisor.qmp import GuestAgent
if sys.stdin.buffer.read() == b"done":
    sys.exit(0)
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        with GuestAgent(sys.argv[1], timeout=10) as ga:
            ga.ping(timeout=10)
            ga.fsfreeze_thaw(timeout=30)
            sys.stderr.write("ihb thaw guard: thawed the guest file systems after the backup died\n")
            sys.exit(0)
    except Exception:
        time.sleep(0.5)
sys.exit(1)
"""


def _start_thaw_guard(agent_socket: str) -> subprocess.Popen[bytes] | None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        # own session: a Ctrl-C or a kill of the backup's process group must not take the guard along
        return subprocess.Popen([sys.executable, "-c", _THAW_GUARD, agent_socket], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, env=env, start_new_session=True)
    except OSError as e:
        log.warning("cannot start the thaw guard (%s); a crash while frozen would need a manual thaw", e)
        return None


def _stop_thaw_guard(guard: subprocess.Popen[bytes], *, thawed: bool) -> None:
    assert guard.stdin is not None
    try:
        if thawed:
            guard.stdin.write(b"done")
        guard.stdin.close()
    except OSError:
        pass
    if thawed:
        try:
            guard.wait(10)
        except subprocess.TimeoutExpired:
            guard.kill()
            guard.wait()


def backup_vm(repo: Repository, qmp_path: str, vm: str | None = None, opts: VMBackupOptions | None = None, *,
              progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> VMBackupResult:
    """Back up every writable disk of the VM behind ``qmp_path`` as one image restore point."""
    opts = opts or VMBackupOptions()
    t_start = time.monotonic()
    start_ns = time.time_ns()
    qmp = QMPClient(qmp_path, timeout=opts.qmp_timeout)
    try:
        # alive=False: a refused connection means no QEMU listens there (a VM that is gone); fail at once
        qmp.connect(timeout=min(opts.qmp_timeout, 10.0), alive=lambda: False)
    except TimeoutError:
        raise VMBackupError(f"cannot talk to QEMU at {qmp_path}: no QMP greeting (does another client hold "
                            "the monitor? give ihb a QMP socket of its own: -qmp unix:PATH,server=on,wait=off)") from None
    except (QMPConnectionError, OSError) as e:
        raise VMBackupError(f"cannot talk to QEMU at {qmp_path}: {str(e).removeprefix(qmp_path + ': ')}") from None
    try:
        qv = QemuVM(qmp)
        if vm is None:
            vm = str((qv.q("query-name") or {}).get("name") or "") or os.path.basename(qmp_path).rsplit(".", 1)[0]
        lock = _VMLock(vm)
        try:
            return _backup_locked(repo, qv, qmp_path, vm, opts, progress, cancel, t_start, start_ns)
        finally:
            lock.release()
    except (QMPError, QMPConnectionError, NBDError) as e:
        raise VMBackupError(f"VM {vm or qmp_path}: {e}") from e
    except TimeoutError as e:
        raise VMBackupError(f"VM {vm or qmp_path}: QEMU did not answer in time ({e})") from e
    finally:
        qmp.close()


def _backup_locked(repo: Repository, qv: QemuVM, qmp_path: str, vm: str, opts: VMBackupOptions,
                   progress: ProgressFn | None, cancel: threading.Event | None, t_start: float,
                   start_ns: int) -> VMBackupResult:
    run: dict[str, Any] = {}
    leftovers = qv.cleanup_leftovers()
    if leftovers:
        log.warning("VM %s: removed leftovers of an interrupted backup: %s", vm, ", ".join(leftovers))
        run["leftovers_removed"] = leftovers
    status = qv.status()
    running = status == "running"
    disks = qv.disks()
    if opts.disks:
        unknown = set(opts.disks) - {d.name for d in disks}
        if unknown:
            raise VMBackupError(f"VM {vm} has no disk {', '.join(sorted(unknown))} "
                                f"(it has {', '.join(d.name for d in disks) or 'none'})")
        disks = [d for d in disks if d.name in opts.disks]
    if not disks:
        raise VMBackupError(f"VM {vm} has no writable disk to back up")
    machine = qv.machine_info(disks)
    machine["status"] = status

    # -- plan the bitmaps ------------------------------------------------------------------------
    prefix = bitmap_prefix(repo.config.repo_id)
    vm_points = [s for s in repo.snapshots() if s.kind == "image" and s.vm == vm]
    on_node = qv.bitmaps()
    plans: dict[str, DiskPlan] = {}
    generations = [0]
    for s in vm_points:
        g = (s.meta.get("cbt") or {}).get("generation")
        if isinstance(g, int) and (s.meta.get("cbt") or {}).get("prefix") == prefix:
            generations.append(g)
    for d in disks:
        bms = on_node.get(d.node, [])
        generations += [g for b in bms if (g := parse_generation(prefix, b.name)) is not None]
        plans[d.name] = plan_disk(d.name, d.size, bms, vm_points, prefix, full=opts.full)
    gen = max(generations) + 1
    new_bitmap = bitmap_name(prefix, gen)
    # leftovers: merge newer generations into the base (never lose a write), drop stale ones
    for d in disks:
        p = plans[d.name]
        if p.base_bitmap and p.merge:
            qv.q("block-dirty-bitmap-merge", node=d.node, target=p.base_bitmap, bitmaps=p.merge)
            log.info("VM %s disk %s: merged %s back into %s", vm, d.name, ", ".join(p.merge), p.base_bitmap)
        if p.base_bitmap:
            qv.q("block-dirty-bitmap-enable", node=d.node, name=p.base_bitmap)
        for b in p.merge + p.remove:
            qv.q("block-dirty-bitmap-remove", node=d.node, name=b)

    # -- scratch space, fleece nodes ---------------------------------------------------------------
    scratch = os.path.join(opts.scratch_dir or os.path.join(data_dir(), "vm-scratch"), _safe(vm))
    os.makedirs(scratch, mode=0o700, exist_ok=True)
    for f in os.listdir(scratch):  # files of a killed run; their nodes are gone (cleanup_leftovers)
        if f.endswith(".fleece.qcow2"):
            os.unlink(os.path.join(scratch, f))
    sock_dir = tempfile.mkdtemp(prefix="ihb-nbd-")
    sock = os.path.join(sock_dir, "nbd.sock")
    fleece = {d.name: f"{FLEECE_PREFIX}{_safe(d.name)}" for d in disks}
    added_nodes: list[str] = []
    started_jobs: list[str] = []
    exports: list[str] = []
    server = False
    transaction_done = False
    committed: Snapshot | None = None
    quiesce: _Quiesce | None = None
    writer: BlobWriter | None = None
    records: list[DiskRecord] = []
    try:
        for d in disks:
            path = os.path.join(scratch, f"{_safe(d.name)}.fleece.qcow2")
            added_nodes += [fleece[d.name], f"{fleece[d.name]}-file"]
            qv.create_fleece(fleece[d.name], d.node, path, d.size)

        # -- quiesce + ONE transaction ----------------------------------------------------------------
        actions: list[dict[str, Any]] = []
        for d in disks:
            p = plans[d.name]
            actions.append({"type": "block-dirty-bitmap-add",
                            "data": {"node": d.node, "name": new_bitmap, "persistent": d.persistent_bitmaps,
                                     "granularity": BITMAP_GRANULARITY}})
            if p.base_bitmap:
                actions.append({"type": "block-dirty-bitmap-disable", "data": {"node": d.node, "name": p.base_bitmap}})
            actions.append({"type": "blockdev-backup",
                            "data": {"job-id": fleece[d.name], "device": d.node, "target": fleece[d.name],
                                     "sync": "none"}})
        agent_path = opts.agent_socket or (qv.agent_socket() if opts.use_agent and running else None)
        quiesce = _Quiesce(vm, agent_path, opts, running)
        try:
            quiesce.freeze()
            t_tx = time.monotonic()
            qv.q("transaction", actions=actions)  # completion-mode grouped is refused with bitmap-add
            transaction_done = True
            started_jobs = list(fleece.values())
            run["transaction_seconds"] = round(time.monotonic() - t_tx, 4)
        finally:
            quiesce.thaw()
            quiesce.close()
        point_ns = time.time_ns()
        consistency = quiesce.consistency(opts.app_consistent)

        # -- export + pull ------------------------------------------------------------------------------
        qv.start_nbd_server(sock)
        server = True
        for d in disks:
            p = plans[d.name]
            exp: dict[str, Any] = {"type": "nbd", "id": f"{OBJ_PREFIX}{_safe(d.name)}", "node-name": fleece[d.name],
                                   "name": d.name, "writable": False}
            if p.base_bitmap and p.mode == "incremental":
                exp["bitmaps"] = [p.base_bitmap]
            qv.q("block-export-add", **exp)
            exports.append(exp["id"])
        now = qv.bitmaps()
        dirty_counts = {d.name: b.count for d in disks for b in now.get(d.node, [])
                        if b.name == plans[d.name].base_bitmap}
        writer = repo.writer()
        with Pipeline() as pipe:
            for d in disks:
                records.append(_pull_disk(repo, writer, pipe, d, plans[d.name], sock, opts, dirty_counts,
                                          progress, cancel))
            pipe.drain()
        for job in started_jobs:  # a failed copy-before-write would have let new data into the fleece
            if not qv.job_alive(job):
                raise VMBackupError(f"VM {vm}: fleecing job {job} stopped during the backup "
                                    "(scratch space full?); the copy is not a consistent point in time")
        writer.flush()

        cbt = {"prefix": prefix, "generation": gen,
               "bitmaps": {d.name: {"name": new_bitmap, "persistent": d.persistent_bitmaps,
                                    "granularity": BITMAP_GRANULARITY} for d in disks},
               "modes": {d.name: plans[d.name].mode for d in disks}}
        bases = {p.base_snapshot.id for p in plans.values() if p.mode == "incremental" and p.base_snapshot}
        parent = next(iter(bases)) if len(bases) == 1 else (vm_points[-1].id if vm_points else None)
        if bases:
            cbt["base"] = sorted(bases)
        totals = {k: sum(int(r.stats.get(k, 0)) for r in records)
                  for k in ("read_bytes", "zero_bytes", "free_skipped_bytes", "dirty_bytes")}
        snap_stats = {**writer.stats, "bytes": sum(d.size for d in disks), **totals,
                      "duration": round(time.monotonic() - t_start, 3)}
        meta = {"vm": vm, "consistency": consistency, "source": "qmp", "qmp": qmp_path,
                "started_ns": start_ns, "point_in_time_ns": point_ns, "quiesce": quiesce.info, "cbt": cbt, "qemu": machine,
                "mode": "incremental" if all(p.mode == "incremental" for p in plans.values()) else
                        ("full" if all(p.mode == "full" for p in plans.values()) else "mixed")}
        if opts.tenant:
            meta["tenant"] = opts.tenant
        committed = repo.store_snapshot(Snapshot(
            id="", kind="image", host=socket.gethostname(), time_ns=point_ns, tags=list(opts.tags), disks=records,
            stats=snap_stats, meta=meta, parent=parent))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        _teardown(qv, vm, exports, server, started_jobs, added_nodes, sock_dir, scratch)
        if transaction_done:
            _finish_bitmaps(qv, vm, disks, plans, new_bitmap, success=committed is not None)
    if committed is not None and not os.environ.get("IHB_NO_IMAGE_CATALOG"):
        t_cat = time.monotonic()
        index_image_snapshot_quietly(repo, committed)  # files inside the guest, for `ihb find`
        run["catalog_seconds"] = round(time.monotonic() - t_cat, 3)
    run["seconds"] = round(time.monotonic() - t_start, 3)
    run["freeze_seconds"] = quiesce.info.get("freeze_seconds") if quiesce else None
    return VMBackupResult(vm, committed, records, run)


def _pull_disk(repo: Repository, writer: BlobWriter, pipe: Pipeline, d: VMDisk, p: DiskPlan, sock: str,
               opts: VMBackupOptions, dirty_counts: dict[str, int], progress: ProgressFn | None,
               cancel: threading.Event | None) -> DiskRecord:
    t0 = time.monotonic()
    incremental = p.mode == "incremental" and p.base_bitmap is not None and p.base_record is not None
    meta = ["base:allocation"] + ([f"qemu:dirty-bitmap:{p.base_bitmap}"] if incremental else [])
    source = NBDSource(NBDClient(unix=sock, export=d.name, meta=meta),
                       dirty_bitmap=p.base_bitmap if incremental else None)
    try:
        t_map = time.monotonic()
        alloc = list(source.extents())
        if incremental:
            dirty = list(source.dirty_extents())
            runs = list(clip_runs(dirty, alloc))
            dirty_bytes = sum(ln for _, ln in dirty)
        else:
            runs = alloc
            dirty_bytes = 0
        data_before = sum(ln for _, ln, has in runs if has)
        free_info: dict[str, Any] = {}
        if opts.skip_free and data_before:
            free, free_info = guest_free_extents(sock, d.name)
            if free:
                runs = list(subtract(runs, free))
        runs = merge_runs(runs)
        free_skipped = data_before - sum(ln for _, ln, has in runs if has)
        map_seconds = time.monotonic() - t_map
        rec = copy_runs(repo, writer, pipe, source, d.name, d.size, runs, p.base_record if incremental else None,
                        progress=progress, cancel=cancel, chunk_size=vm_chunk_size(repo))
    finally:
        source.close()
    rec.stats.update({
        "mode": p.mode, "reason": p.reason, "dirty_bytes": dirty_bytes,
        "bitmap_dirty_bytes": dirty_counts.get(d.name, 0) if incremental else 0,
        "free_skipped_bytes": free_skipped, "seconds": round(time.monotonic() - t0, 3),
        "map_seconds": round(map_seconds, 3),
    })
    if free_info:
        rec.stats["freemap"] = free_info
    return rec


def _teardown(qv: QemuVM, vm: str, exports: list[str], server: bool, jobs: list[str], nodes: list[str],
              sock_dir: str, scratch: str) -> None:
    """Undo what the run created in QEMU, each step on its own: one failure must not skip the rest."""
    steps: list[tuple[str, Callable[[], None]]] = []
    steps += [(f"export {e}", lambda e=e: qv.del_export(e)) for e in exports]
    if server:
        steps.append(("nbd server", qv.stop_nbd_server))
    steps += [(f"job {j}", lambda j=j: qv.cancel_job(j)) for j in jobs]
    steps += [(f"node {n}", lambda n=n: qv.del_node(n)) for n in nodes]
    for what, fn in steps:
        try:
            fn()
        except Exception as e:  # QEMU gone, or already removed; the next run cleans up the rest
            log.warning("VM %s: cannot remove %s: %s", vm, what, e)
    shutil.rmtree(sock_dir, ignore_errors=True)
    for n in nodes:
        if n.endswith("-file"):
            continue
        try:
            os.unlink(os.path.join(scratch, n[len(FLEECE_PREFIX):] + ".fleece.qcow2"))
        except FileNotFoundError:
            pass


def _finish_bitmaps(qv: QemuVM, vm: str, disks: Sequence[VMDisk], plans: dict[str, DiskPlan], new_bitmap: str,
                    *, success: bool) -> None:
    """After the commit: drop the old generation. Before it: fold the new one back into the old one, so
    the next run still sees every write since the last restore point (or no bitmap: a full copy)."""
    for d in disks:
        p = plans[d.name]
        try:
            if success:
                if p.base_bitmap:
                    qv.q("block-dirty-bitmap-remove", node=d.node, name=p.base_bitmap)
            else:
                if p.base_bitmap:
                    qv.q("block-dirty-bitmap-merge", node=d.node, target=p.base_bitmap, bitmaps=[new_bitmap])
                    qv.q("block-dirty-bitmap-enable", node=d.node, name=p.base_bitmap)
                qv.q("block-dirty-bitmap-remove", node=d.node, name=new_bitmap)
        except Exception as e:
            # the next run's plan_disk repairs it (newer generations are merged into the base)
            log.warning("VM %s disk %s: bitmap clean-up failed (next run repairs it): %s", vm, d.name, e)


# === many VMs =========================================================================================


@dataclass(frozen=True)
class VMTarget:
    vm: str
    qmp: str
    agent: str | None = None


def targets_in_dir(qmp_dir: str) -> list[VMTarget]:
    """VMs of a directory of QMP sockets: ``NAME.qmp`` (or ``NAME.sock``), optional ``NAME.qga``."""
    out: list[VMTarget] = []
    try:
        names = sorted(os.listdir(qmp_dir))
    except OSError as e:
        raise VMBackupError(f"cannot list {qmp_dir}: {e.strerror}") from None
    for f in names:
        stem, _, ext = f.rpartition(".")
        if ext not in ("qmp", "sock") or not stem:
            continue
        path = os.path.join(qmp_dir, f)
        try:
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                continue
        except OSError:
            continue
        qga = os.path.join(qmp_dir, f"{stem}.qga")
        out.append(VMTarget(stem, path, qga if os.path.exists(qga) else None))
    return out


def backup_many(repo: Repository, targets: Sequence[VMTarget], opts: VMBackupOptions, *, parallel: int = 2,
                cancel: threading.Event | None = None,
                on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Back up many VMs with at most ``parallel`` at a time; a failure is recorded, never contagious."""
    cancel = cancel or threading.Event()

    def one(t: VMTarget) -> dict[str, Any]:
        t0 = time.monotonic()
        o = dataclasses.replace(opts, agent_socket=t.agent or opts.agent_socket)
        try:
            if cancel.is_set():
                raise Cancelled("cancelled before it started")
            res = backup_vm(repo, t.qmp, t.vm, o, cancel=cancel).summary()
        except IhbError as e:
            res = {"vm": t.vm, "ok": False, "qmp": t.qmp, "error": str(e), "exit_code": e.exit_code}
        except Exception as e:  # a bug for one VM must not end the others
            log.exception("VM %s: unexpected error", t.vm)
            res = {"vm": t.vm, "ok": False, "qmp": t.qmp, "error": f"{type(e).__name__}: {e}", "exit_code": 3}
        res["seconds"] = round(time.monotonic() - t0, 3)
        if on_result is not None:
            on_result(res)
        return res

    with concurrent.futures.ThreadPoolExecutor(max(1, parallel), thread_name_prefix="ihb-vm") as ex:
        futs = [ex.submit(one, t) for t in targets]
        try:
            return [f.result() for f in futs]
        except BaseException:
            cancel.set()  # running backups stop at their next block and merge their bitmaps back
            raise


def result_json(results: list[dict[str, Any]]) -> str:
    return json.dumps(results, indent=1, default=lambda o: o.hex() if isinstance(o, bytes) else str(o))
