"""`ihb vm backup` of a running QEMU disk: full, incremental after 1% of the blocks changed, and an
incremental with nothing changed; the full compared with `borg create` and `restic backup` of the same
raw image, in the same run.

    python bench/vm_bench.py [--work /tmp/ihbbench/vm] [--size-gib 10] [--fill 0.4] [--changed 0.01]
                             [--tools ihb,borg,restic] [--keep]

The disk: a sparse raw image of SIZE with FILL of it written in 4 MiB extents at random places (each
64 KiB block half random bytes, half zeros: about 2:1 for zstd, no duplicates), under a qcow2 overlay
that holds the persistent dirty bitmap. QEMU runs it with no guest at all (``-S``, no kernel): dirty
bitmaps, fleecing and the NBD export need only the block layer. The changes are CHANGED of the 64 KiB
blocks, at random places, written through a writable NBD export of the disk node (so the bitmap sees
them, as it would see a guest's writes) with random content.

Peers: borg 1.2 with its recommended settings for disk images (``--chunker-params fixed,4194304 --sparse``,
``--compression zstd,3``, repokey-blake2), restic with repository format 2 (``--compression auto``);
both read the raw image file. The page cache is dropped before every timed command when permitted.
Writes bench/out/vm-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT))

from benchutil import byte_compile, drop_caches, hold_host_memory  # noqa: E402

from appliance.hypervisor.nbd import NBDClient  # noqa: E402
from appliance.hypervisor.qmp import QMPClient  # noqa: E402

PASSPHRASE = "bench-passphrase-not-secret"
MiB = 1 << 20
GiB = 1 << 30
BLOCK = 64 * 1024
EXTENT = 4 * MiB


class WritableNBD(NBDClient):
    """NBD WRITE on top of the project's read client; only the benchmark needs to write."""

    def pwrite(self, offset: int, data: bytes) -> None:
        self._request(1, offset, len(data))  # NBD_CMD_WRITE, payload follows the header
        self.sock.sendall(data)
        self._reply_chunk()

    def flush(self) -> None:
        self._request(3, 0, 0)  # NBD_CMD_FLUSH
        self._reply_chunk()


def du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def run(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> tuple[float, str]:
    """Wall time and stdout of a command that must succeed (a sync after it is included: durable)."""
    drop_caches()
    t0 = time.monotonic()
    p = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    subprocess.run(["sync"], check=True)
    wall = time.monotonic() - t0
    if log is not None:
        log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return round(wall, 2), p.stdout


def make_image(path: Path, size: int, fill: float, rnd: random.Random) -> int:
    """Sparse raw image with ``fill`` of it in data extents; returns the data bytes."""
    slots = size // EXTENT
    chosen = sorted(rnd.sample(range(slots), int(slots * fill)))
    half = bytes(BLOCK // 2)
    with open(path, "wb") as f:
        f.truncate(size)
        for s in chosen:
            buf = b"".join(os.urandom(BLOCK // 2) + half for _ in range(EXTENT // BLOCK))
            os.pwrite(f.fileno(), buf, s * EXTENT)
    return len(chosen) * EXTENT


class Qemu:
    """QEMU without a guest (``-S``: the CPU never starts): one virtio disk ``disk0`` (qcow2 overlay over the
    raw image; ``share-rw`` so the benchmark's NBD export may write beside the device), two monitors."""

    def __init__(self, work: Path, overlay: Path) -> None:
        self.ctl_path = work / "ctl.qmp"
        self.ihb_qmp = work / "ihb.qmp"
        node = {"node-name": "disk0", "driver": "qcow2", "file": {"driver": "file", "filename": str(overlay)}}
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-nodefaults", "-nographic", "-monitor", "none", "-S",
             "-qmp", f"unix:{self.ctl_path},server=on,wait=off", "-qmp", f"unix:{self.ihb_qmp},server=on,wait=off",
             "-blockdev", json.dumps(node), "-device", "virtio-blk-pci,drive=disk0,id=disk0,share-rw=on"],
            stdin=subprocess.DEVNULL, stdout=open(work / "qemu.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        self.qmp = QMPClient(self.ctl_path, timeout=120).connect(alive=lambda: self.proc.poll() is None)
        self.nbd_sock = str(work / "bench-nbd.sock")

    def export(self, writable: bool) -> None:
        self.qmp.execute("nbd-server-start", addr={"type": "unix", "data": {"path": self.nbd_sock}})
        self.qmp.execute("block-export-add", type="nbd", id="bench", name="disk0", writable=writable,
                         **{"node-name": "disk0"})

    def unexport(self) -> None:
        self.qmp.execute("block-export-del", id="bench")
        self.qmp.wait_event("BLOCK_EXPORT_DELETED", timeout=60, match=lambda e: e["data"]["id"] == "bench")
        self.qmp.execute("nbd-server-stop")

    def dirty_count(self) -> int:
        for n in self.qmp.execute("query-named-block-nodes", flat=True):
            if n["node-name"] == "disk0":
                return sum(b["count"] for b in n.get("dirty-bitmaps") or [] if str(b.get("name", "")).startswith("ihb-"))
        return 0

    def quit(self) -> None:
        try:
            self.qmp.execute("quit")
        except Exception:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def ihb_backup(work: Path, env: dict[str, str], qmp: Path, label: str) -> dict[str, Any]:
    wall, out = run([sys.executable, "-m", "appliance.cli", "vm", "backup", "--qmp", str(qmp), "--vm", "bench",
                     "--json"], env, work / f"ihb-{label}.log")
    r = json.loads(out)
    d = r["disk_stats"]["disk0"]
    return {"wall_s": wall, "ihb_duration_s": r["stats"]["duration"], "mode": d["mode"],
            "read_bytes": d["read_bytes"], "zero_bytes": d["zero_bytes"], "dirty_bytes": d.get("dirty_bytes", 0),
            "bitmap_dirty_bytes": d.get("bitmap_dirty_bytes", 0), "new_bytes": r["stats"]["new_bytes"],
            "stored_bytes": r["stats"]["stored_bytes"], "snapshot": r["id"],
            "freeze_or_tx_s": r["run"].get("transaction_seconds")}


def verify(env: dict[str, str], q: Qemu, snapshot: str, offsets: list[int], rnd: random.Random, size: int) -> int:
    """Changed blocks plus random ones: the restore point reads what QEMU serves for the disk."""
    from repo.image import ImageReader
    from repo.repository import Repository

    sample = sorted(set(offsets) | {rnd.randrange(size // BLOCK) * BLOCK for _ in range(512)})
    q.export(writable=False)
    try:
        live = NBDClient(unix=q.nbd_sock, export="disk0")
        with Repository.open(env["IHB_REPO"], lambda: PASSPHRASE.encode()) as repo:
            snap = repo.get_snapshot(snapshot)
            reader = ImageReader(repo, snap.disks[0])
            for off, data in zip(sample, live.read_many((o, BLOCK) for o in sample), strict=True):
                if reader.read(off, BLOCK) != data:
                    raise SystemExit(f"VERIFY FAILED: restore point {snapshot[:8]} differs at offset {off}")
        live.close()
    finally:
        q.unexport()
    return len(sample)


def main() -> None:
    byte_compile()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ihbbench/vm"))
    ap.add_argument("--size-gib", type=float, default=10)
    ap.add_argument("--fill", type=float, default=0.4, help="fraction of the disk holding data")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of the 64 KiB blocks changed")
    ap.add_argument("--tools", default="ihb,borg,restic")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--image-chunk-size", type=int, default=0, help="ihb init --image-chunk-size (default: ihb's)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    print(hold_host_memory(), file=sys.stderr, flush=True)
    tools = a.tools.split(",")
    size = int(a.size_gib * GiB) // EXTENT * EXTENT
    rnd = random.Random(a.seed)
    if a.work.exists():
        shutil.rmtree(a.work)
    a.work.mkdir(parents=True)
    res: dict[str, Any] = {"date": dt.datetime.now().isoformat(timespec="seconds"), "size": size, "fill": a.fill,
                           "changed_fraction": a.changed, "cpus": os.cpu_count(),
                           "drop_caches": drop_caches(), "versions": {}}
    raw = a.work / "disk.raw"
    t0 = time.monotonic()
    res["data_bytes"] = make_image(raw, size, a.fill, rnd)
    res["make_image_s"] = round(time.monotonic() - t0, 1)
    print(f"image: {size / GiB:.1f} GiB, {res['data_bytes'] / GiB:.2f} GiB data ({res['make_image_s']} s)")

    if "borg" in tools:
        env = {"BORG_PASSPHRASE": PASSPHRASE, "BORG_REPO": str(a.work / "repo-borg"),
               "BORG_BASE_DIR": str(a.work / "borg-base")}
        res["versions"]["borg"] = subprocess.run(["borg", "--version"], capture_output=True, text=True).stdout.strip()
        run(["borg", "init", "-e", "repokey-blake2"], env)
        wall, out = run(["borg", "create", "--json", "--compression", "zstd,3", "--chunker-params", "fixed,4194304",
                         "--sparse", "::full", str(raw)], env, a.work / "borg.log")
        st = json.loads(out)["archive"]["stats"]
        res["borg"] = {"wall_s": wall, "original_bytes": st["original_size"], "stored_bytes": du(a.work / "repo-borg")}
        print(f"borg full: {wall} s, repo {res['borg']['stored_bytes'] / MiB:.0f} MiB")
    if "restic" in tools:
        env = {"RESTIC_PASSWORD": PASSPHRASE, "RESTIC_REPOSITORY": str(a.work / "repo-restic"),
               "RESTIC_CACHE_DIR": str(a.work / "restic-cache")}
        res["versions"]["restic"] = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.strip()
        run(["restic", "init", "--repository-version", "2"], env)
        wall, out = run(["restic", "backup", "--json", "--compression", "auto", str(raw)], env, a.work / "restic.log")
        summary = [json.loads(line) for line in out.splitlines() if '"summary"' in line][-1]
        res["restic"] = {"wall_s": wall, "processed_bytes": summary["total_bytes_processed"],
                         "stored_bytes": du(a.work / "repo-restic")}
        print(f"restic full: {wall} s, repo {res['restic']['stored_bytes'] / MiB:.0f} MiB")

    if "ihb" in tools:
        overlay = a.work / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(overlay)], check=True)
        env = {"IHB_REPO": str(a.work / "repo-ihb"), "IHB_PASSPHRASE": PASSPHRASE,
               "IHB_CACHE_DIR": str(a.work / "ihb-cache"), "IHB_DATA_DIR": str(a.work / "ihb-data"),
               "IHB_CONFIG_DIR": str(a.work / "ihb-etc")}
        res["versions"]["ihb"] = subprocess.run([sys.executable, "-m", "appliance.cli", "--version"], capture_output=True,
                                                text=True, cwd=PROJECT).stdout.strip()
        res["versions"]["qemu"] = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                                 text=True).stdout.splitlines()[0]
        run([sys.executable, "-m", "appliance.cli", "init",
             *(["--image-chunk-size", str(a.image_chunk_size)] if a.image_chunk_size else [])], env)
        res["ihb_cli_startup_s"] = run([sys.executable, "-m", "appliance.cli", "--version"], env)[0]
        q = Qemu(a.work, overlay)
        try:
            full = ihb_backup(a.work, env, q.ihb_qmp, "full")
            full["stored_bytes_repo"] = du(a.work / "repo-ihb")
            print(f"ihb full: {full['wall_s']} s, read {full['read_bytes'] / MiB:.0f} MiB")
            nblocks = size // BLOCK
            offsets = sorted(o * BLOCK for o in rnd.sample(range(nblocks), int(nblocks * a.changed)))
            q.export(writable=True)
            w = WritableNBD(unix=q.nbd_sock, export="disk0")
            t0 = time.monotonic()
            for off in offsets:
                w.pwrite(off, os.urandom(BLOCK))
            w.flush()
            w.close()
            q.unexport()
            changed = len(offsets) * BLOCK
            write_s = round(time.monotonic() - t0, 2)
            dirty = q.dirty_count()
            print(f"changed {len(offsets)} blocks = {changed / MiB:.1f} MiB in {write_s} s; bitmap {dirty / MiB:.1f} MiB")
            before = du(a.work / "repo-ihb")
            inc = ihb_backup(a.work, env, q.ihb_qmp, "incremental")
            inc["stored_bytes_repo_delta"] = du(a.work / "repo-ihb") - before
            print(f"ihb incremental: {inc['wall_s']} s, read {inc['read_bytes'] / MiB:.1f} MiB")
            before = du(a.work / "repo-ihb")
            nochange = ihb_backup(a.work, env, q.ihb_qmp, "nochange")
            nochange["stored_bytes_repo_delta"] = du(a.work / "repo-ihb") - before
            print(f"ihb no-change incremental: {nochange['wall_s']} s, read {nochange['read_bytes']} B")
            verified = verify(env, q, inc["snapshot"], offsets, rnd, size)
        finally:
            q.quit()
        res["ihb"] = {"full": full, "incremental": inc, "nochange": nochange, "changed_bytes": changed,
                      "changed_blocks": len(offsets), "bitmap_bytes": dirty, "write_changes_s": write_s,
                      "verified_blocks": verified,
                      "incremental_read_over_changed": round(inc["read_bytes"] / changed, 3),
                      "incremental_time_over_full": round(inc["wall_s"] / full["wall_s"], 4),
                      "incremental_inside_over_full": round(inc["ihb_duration_s"] / full["ihb_duration_s"], 4)}
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"vm-{stamp}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"vm-{stamp}.md").write_text(report(res))
    print(report(res))
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)


def report(r: dict[str, Any]) -> str:
    L = [f"# VM image backup benchmark ({r['date']})", "",
         f"Disk {r['size'] / GiB:.1f} GiB (sparse raw + qcow2 overlay), {r['data_bytes'] / GiB:.2f} GiB of data, "
         f"{r['changed_fraction']:.1%} of the 64 KiB blocks changed; {r['cpus']} CPUs; page cache dropped: "
         f"{r['drop_caches']}. Wall times include process start-up (cold: the page cache is dropped before "
         "each command) and a final `sync`; 'inside ihb' is the backup's own duration, from QMP connect to "
         "restore-point commit. borg with --sparse reads only the data extents (its 'input size' counts the "
         "holes); restic reads the whole file.", ""]
    L += ["| run | wall s | inside ihb s | bytes read (ihb) / input size (peers) | stored (repo growth) |",
          "|---|---:|---:|---:|---:|"]
    ih = r.get("ihb")
    if ih:
        f, i, n = ih["full"], ih["incremental"], ih["nochange"]
        L.append(f"| ihb full | {f['wall_s']} | {f['ihb_duration_s']} | {f['read_bytes'] / MiB:.0f} MiB | "
                 f"{f['stored_bytes_repo'] / MiB:.0f} MiB |")
        L.append(f"| ihb incremental | {i['wall_s']} | {i['ihb_duration_s']} | {i['read_bytes'] / MiB:.1f} MiB | "
                 f"{i['stored_bytes_repo_delta'] / MiB:.1f} MiB |")
        L.append(f"| ihb no-change incremental | {n['wall_s']} | {n['ihb_duration_s']} | {n['read_bytes']} B | "
                 f"{n['stored_bytes_repo_delta'] / 1024:.0f} KiB |")
    if "borg" in r:
        b = r["borg"]
        L.append(f"| borg create (fixed 4 MiB, --sparse) | {b['wall_s']} | | {b['original_bytes'] / MiB:.0f} MiB | "
                 f"{b['stored_bytes'] / MiB:.0f} MiB |")
    if "restic" in r:
        s = r["restic"]
        L.append(f"| restic backup | {s['wall_s']} | | {s['processed_bytes'] / MiB:.0f} MiB | "
                 f"{s['stored_bytes'] / MiB:.0f} MiB |")
    if ih:
        ok_read = ih["incremental_read_over_changed"] <= 1.5
        ok_time = ih["incremental_time_over_full"] < 0.05
        L += ["", f"- changed: {ih['changed_blocks']} blocks, {ih['changed_bytes'] / MiB:.1f} MiB; dirty bitmap "
              f"{ih['bitmap_bytes'] / MiB:.1f} MiB",
              f"- incremental read / changed = {ih['incremental_read_over_changed']} (target <= 1.5: "
              f"{'met' if ok_read else 'MISSED'})",
              f"- incremental time / full time = {ih['incremental_time_over_full']:.2%} wall (target < 5%: "
              f"{'met' if ok_time else 'MISSED'}); inside ihb {ih['incremental_inside_over_full']:.2%}; a cold "
              f"`ihb --version` alone takes {r.get('ihb_cli_startup_s')} s wall",
              f"- no-change incremental: {n['wall_s']} s wall ({n['ihb_duration_s']} s inside ihb)",
              f"- verified {ih['verified_blocks']} blocks (all changed + 512 random) of the incremental restore "
              "point against QEMU's view of the disk"]
    L += ["", "Versions: " + "; ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
