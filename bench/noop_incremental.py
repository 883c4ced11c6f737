"""The cost of an incremental backup when nothing changed: what a frequent schedule (every few minutes)
pays per run when there is nothing to back up.

    python bench/noop_incremental.py [--work /tmp/ihbbench/noop] [--files 50000] [--image-mib 2048]
                                     [--fill 0.5] [--runs 3] [--drop-caches] [--keep]

Three cases, each after a first full backup into a fresh encrypted repository:

* **files**: `ihb backup TREE` of a tree of FILES small files (0.5-8 KiB, random, 25 per directory)
  that did not change: the files cache answers from (inode, size, mtime, ctime), nothing is read;
* **image, full read**: `ihb backup-image --vm V --disk vda IMG` of the unchanged raw image: without
  change information every allocated block is read and hashed and found already stored (holes are
  skipped from SEEK_DATA/SEEK_HOLE);
* **image, CBT**: an incremental over the previous restore point's map with an empty changed-block
  list, which is what `ihb vm backup` does when QEMU's dirty bitmap is clean (the QMP transaction and
  the NBD fleecing export that `ihb vm backup` adds are not included).

Per run: wall time, CPU (user + system), bytes read through read(2) by the process (``rchar`` of
/proc/PID/io: sources, packs, everything), bytes read from disk (``read_bytes``; 0 when the page cache
holds it), the backup's own counters (bytes read from the source, new, stored) and the growth of the
repository directory (the new restore point object, index and pack trailers). The best of RUNS runs
is reported (the machine is shared). ``--drop-caches`` (root) empties the page cache before each run.
Writes bench/out/noop-<date>.md and .json.
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
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT))

PASS = "bench"


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def make_tree(root: Path, n: int, rnd: random.Random) -> int:
    total = 0
    for i in range(n):
        d = root / f"d{i // 625:03d}" / f"s{(i // 25) % 25:02d}"
        if i % 25 == 0:
            d.mkdir(parents=True, exist_ok=True)
        size = rnd.randint(512, 8192)
        (d / f"f{i:06d}.dat").write_bytes(rnd.randbytes(size // 2) + bytes(size - size // 2))
        total += size
    return total


def make_image(path: Path, size: int, fill: float, rnd: random.Random) -> int:
    """A sparse raw image with FILL of it written in 4 MiB extents (half random, half zeros per 64 KiB)."""
    ext = 4 << 20
    n = int(size * fill) // ext
    slots = rnd.sample(range(size // ext), n)
    with open(path, "wb") as f:
        f.truncate(size)
        for s in sorted(slots):
            f.seek(s * ext)
            f.write(b"".join(rnd.randbytes(32768) + bytes(32768) for _ in range(ext // 65536)))
    return n * ext


def measure(argv: list[str], env: dict[str, str], drop: bool) -> dict[str, Any]:
    """Run argv; wall time, rusage and /proc/PID/io sampled until it exits."""
    if drop:
        drop_caches()
    t0 = time.monotonic()
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    io: dict[str, int] = {}
    out: list[bytes] = []

    def reader() -> None:
        assert p.stdout is not None
        out.append(p.stdout.read())

    th = threading.Thread(target=reader)
    th.start()
    while p.poll() is None:  # the last sample before exit holds the totals (zombies have no io file)
        try:
            with open(f"/proc/{p.pid}/io") as f:
                io = {k: int(v) for k, v in (ln.split(": ") for ln in f.read().splitlines())}
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    status = p.returncode
    th.join()
    wall = time.monotonic() - t0
    err = p.stderr.read().decode() if p.stderr else ""
    if status != 0:
        raise SystemExit(f"{' '.join(argv)} exited {status}: {err}")
    return {"wall_s": round(wall, 3), "rchar": io.get("rchar", 0), "read_bytes_disk": io.get("read_bytes", 0),
            "stdout": b"".join(out).decode()}


def timed_cpu(fn: Any) -> tuple[Any, float]:
    before = os.times()
    r = fn()
    after = os.times()
    return r, round((after.children_user - before.children_user) + (after.children_system - before.children_system), 3)


def ihb_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "appliance.cli", *args]


def summary_of(stdout: str) -> dict[str, Any]:
    for ln in reversed(stdout.strip().splitlines() or ["{}"]):
        try:
            o = json.loads(ln)
        except ValueError:
            continue
        if isinstance(o, dict):
            return o
    try:
        o = json.loads(stdout)
    except ValueError:
        return {}
    return o if isinstance(o, dict) else {}


def run_case(name: str, argv: list[str], env: dict[str, str], repo: Path, runs: int, drop: bool) -> dict[str, Any]:
    """The best (shortest) of RUNS runs; ``first_new`` keeps what the first one stored."""
    best: dict[str, Any] | None = None
    first_new: int | None = None
    for _ in range(runs):
        size0 = du(repo)
        m, cpu = timed_cpu(lambda: measure(argv, env, drop))
        growth = du(repo) - size0
        s = summary_of(m.pop("stdout"))
        stats = s.get("stats", {})
        row = {"case": name, **m, "cpu_s": cpu, "source_read": stats.get("read_bytes", 0),
               "new": stats.get("new_bytes", 0), "stored": stats.get("stored_bytes", 0), "repo_growth": growth,
               "files": stats.get("files"), "cached_files": stats.get("cached_files")}
        print(f"  {name}: {row['wall_s']:.2f} s wall, {cpu:.2f} s CPU, rchar {row['rchar']:,}, source read "
              f"{row['source_read']:,}, new {row['new']:,}, repo +{growth:,} B", flush=True)
        if first_new is None:
            first_new = row["new"]
        if best is None or row["wall_s"] < best["wall_s"]:
            best = row
    assert best is not None
    best["first_new"] = first_new
    return best


def cbt_child(repo: str, vm: str, image: str) -> None:
    """Runs in its own process: an incremental of VM's disk vda over its last restore point with no
    changed blocks (a clean dirty bitmap), stored as a restore point like `ihb vm backup` does."""
    from appliance.hypervisor.image_backup import backup_disk
    from appliance.hypervisor.sources import open_source
    from repo.repository import Repository
    from repo.snapshot import Snapshot
    from repo.workers import Pipeline

    start = time.time_ns()
    with Repository.open(repo, lambda: PASS.encode()) as r:
        prev = [s for s in r.snapshots() if s.kind == "image" and s.vm == vm][-1]
        base = next(d for d in prev.disks if d.name == "vda")
        src = open_source(image)
        try:
            writer = r.writer()
            with Pipeline() as pipe:
                rec = backup_disk(r, writer, pipe, src, "vda", base=base, changed=[])
                pipe.drain()
                writer.flush()
        finally:
            src.close()
        snap = r.store_snapshot(Snapshot(
            id="", kind="image", host="bench", time_ns=start, disks=[rec],
            stats={**writer.stats, "bytes": rec.size, "read_bytes": rec.stats["read_bytes"]},
            meta={"vm": vm, "consistency": "crash-consistent", "source": image}, parent=prev.id))
    print(json.dumps({"message_type": "summary", **snap.summary()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/ihbbench/noop")
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--image-mib", type=int, default=2048)
    ap.add_argument("--fill", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--cbt-child", nargs=3, metavar=("REPO", "VM", "IMAGE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cbt_child:
        cbt_child(*a.cbt_child)
        return
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rnd = random.Random(42)
    repo = work / "repo"
    env = {**os.environ, "IHB_REPO": str(repo), "IHB_PASSPHRASE": PASS, "IHB_CACHE_DIR": str(work / "cache"),
           "IHB_CONFIG_DIR": str(work / "etc"), "IHB_DATA_DIR": str(work / "data"), "PYTHONPATH": str(PROJECT)}
    for k in ("IHB_CONFIG", "IHB_TESTONLY_WEAK_KDF"):
        env.pop(k, None)
    tree, image = work / "tree", work / "disk.raw"
    t = time.monotonic()
    tree_bytes = make_tree(tree, a.files, rnd)
    img_bytes = make_image(image, a.image_mib << 20, a.fill, rnd)
    print(f"dataset: {a.files} files ({tree_bytes:,} B), image {a.image_mib} MiB with {img_bytes:,} B written "
          f"({time.monotonic() - t:.0f} s)", flush=True)
    subprocess.run(ihb_argv("init"), env=env, check=True, capture_output=True)

    rows = [run_case("baseline: `ihb --version` (interpreter and CLI start-up)", ihb_argv("--version"), env, repo,
                     a.runs, False)]
    print("files", flush=True)
    rows.append(run_case("files: first (full) backup", ihb_argv("backup", str(tree), "--host", "bench", "--json"),
                         env, repo, 1, a.drop_caches))
    rows.append(run_case("baseline: `ihb snapshots` (start-up, key derivation, index)",
                         ihb_argv("snapshots", "--json"), env, repo, a.runs, False))
    rows.append(run_case("files: no-change incremental", ihb_argv("backup", str(tree), "--host", "bench", "--json"),
                         env, repo, a.runs, a.drop_caches))
    print("image", flush=True)
    img = ihb_argv("backup-image", "--vm", "benchvm", "--disk", "vda", str(image), "--json")
    rows.append(run_case("image: first (full) backup", img, env, repo, 1, a.drop_caches))
    rows.append(run_case("image: no-change, full read (backup-image)", img, env, repo, a.runs, a.drop_caches))
    rows.append(run_case("image: no-change, CBT (empty dirty bitmap)",
                         [sys.executable, str(HERE / "noop_incremental.py"), "--cbt-child", str(repo), "benchvm",
                          str(image)], env, repo, a.runs, a.drop_caches))

    head = subprocess.run(["git", "-C", str(PROJECT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    now = dt.datetime.now(dt.UTC)
    meta = {"time": now.isoformat(timespec="seconds"), "git": head, "files": a.files, "tree_bytes": tree_bytes,
            "image_bytes": a.image_mib << 20, "image_written": img_bytes, "runs": a.runs,
            "drop_caches": a.drop_caches, "cpus": os.cpu_count(), "load": os.getloadavg()}
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    stem = out / f"noop-{now.strftime('%Y%m%d-%H%M')}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# No-change incremental cost ({meta['time']}, git {head})", "",
             f"{a.files} files ({tree_bytes / 2**20:.0f} MiB); raw image {a.image_mib} MiB with "
             f"{img_bytes / 2**20:.0f} MiB written; best of {a.runs}; page cache "
             f"{'dropped' if a.drop_caches else 'warm'}; load {meta['load'][0]:.1f}", "",
             "| case | wall | CPU | read(2) bytes | from disk | source read | new | stored | repo growth |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    firsts = [f"{r['case']}: {r['first_new']:,} B" for r in rows if "no-change" in r["case"]]
    for r in rows:
        lines.append(f"| {r['case']} | {r['wall_s']:.2f} s | {r['cpu_s']:.2f} s | {r['rchar'] / 2**20:.1f} MiB | "
                     f"{r['read_bytes_disk'] / 2**20:.1f} MiB | {r['source_read'] / 2**20:.1f} MiB | "
                     f"{r['new']:,} B | {r['stored']:,} B | {r['repo_growth']:,} B |")
    lines += ["", "New bytes of the first of the runs (the others are best-of): " + "; ".join(firsts) + "."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
