"""Chunk-size study: the data behind the defaults in repo/format.py (CDC ~1 MiB average, 256 KiB image chunks).

    python bench/chunk_sizes.py [--work /tmp/ihbbench/chunks] [--scale 1.0]

It generates the benchmark dataset twice (``v1``, and ``v2`` = v1 + the ~5% mutation), then:

File CDC (repo.chunker.FileChunker through the real backup path, encrypted repository, zstd 3): for each
(min, avg, max), back up v1 and then v2 into a fresh repository (files cache off, so every byte of v2 is
chunked and deduplicated against v1) and report the first-backup throughput, the bytes v2 added (and
their ratio to the bytes the mutation really changed), the number of chunks (index entries) and the
index size.

Disk images (repo.image.ImageWriter / ImageReader): for each fixed chunk size, write the v1 ext4 image,
then the v2 image as a full image (dedup against v1 by chunk id, which is what a dirty-bitmap incremental
stores too), and report write throughput, the bytes v2 added, chunk and map-page counts, and the cost of a
4 KiB random read (read + decrypt + decompress of the chunk holding it, no chunk cache) with the page cache
warm and, for a sample, cold.

Source data is read with a warm page cache (the dataset fits in RAM) so that the comparison is about
chunking, not the disk. Writes bench/out/chunks-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(PROJECT))

import dataset  # noqa: E402

from repo.backup import BackupOptions, backup_paths  # noqa: E402
from repo.chunker import FileChunker  # noqa: E402
from repo.extents import data_extents  # noqa: E402
from repo.image import ImageReader, ImageWriter  # noqa: E402
from repo.reader import ChunkCache, ChunkSource  # noqa: E402
from repo.repository import Repository  # noqa: E402
from repo.snapshot import DiskRecord  # noqa: E402
from repo.workers import Pipeline  # noqa: E402

KiB, MiB, MB = 1024, 1024 * 1024, 1_000_000
PASS = b"chunk-study"
CDC_CONFIGS = [
    (64 * KiB, 256 * KiB, 1 * MiB),
    (128 * KiB, 512 * KiB, 2 * MiB),
    (256 * KiB, 1 * MiB, 4 * MiB),  # default
    (512 * KiB, 2 * MiB, 8 * MiB),
    (1 * MiB, 4 * MiB, 16 * MiB),
]
IMAGE_SIZES = [64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB]


def human(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def du_alloc(path: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def warm(path: Path) -> None:
    """Read a tree once so that every configuration starts from the same warm page cache."""
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                continue
            with open(p, "rb") as fh:
                while fh.read(8 * MiB):
                    pass


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def open_repo(work: Path, name: str, **init: Any) -> Repository:
    loc = work / f"repo-{name}"
    cache = work / f"cache-{name}"
    for p in (loc, cache):
        shutil.rmtree(p, ignore_errors=True)
    Repository.init(str(loc), PASS, **init)
    return Repository.open(str(loc), lambda: PASS, cache_dir=str(cache))


def cleanup(work: Path, name: str) -> None:
    shutil.rmtree(work / f"repo-{name}", ignore_errors=True)
    shutil.rmtree(work / f"cache-{name}", ignore_errors=True)


def chunker_only(files: list[Path], mn: int, avg: int, mx: int) -> tuple[float, int, int]:
    """FastCDC alone (no hashing) over the given files: (MB/s, chunks, bytes)."""
    ch = FileChunker(mn, avg, mx, seed=0x1234_5678)
    n = total = 0
    t0 = time.monotonic()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            for c in ch.chunks(fd, 0, os.fstat(fd).st_size):
                n += 1
                total += len(c)
        finally:
            os.close(fd)
    return total / MB / (time.monotonic() - t0), n, total


# --- file CDC ------------------------------------------------------------------------------------------
def cdc_study(work: Path, v1: Path, v2: Path, changed: int, v1_bytes: int, v2_bytes: int) -> list[dict[str, Any]]:
    rows = []
    for mn, avg, mx in CDC_CONFIGS:
        name = f"cdc-{mn // KiB}-{avg // KiB}-{mx // KiB}"
        big = sorted(p for p in (v1 / "large").iterdir())
        cdc_mbps, cdc_n, cdc_bytes = chunker_only(big, mn, avg, mx)
        repo = open_repo(work, name)
        repo.config = dataclasses.replace(repo.config, cdc_min=mn, cdc_avg=avg, cdc_max=mx)
        opts = BackupOptions(host="study", use_files_cache=False)
        t0 = time.monotonic()
        s1 = backup_paths(repo, [str(v1)], opts).stats
        t1 = time.monotonic() - t0
        t0 = time.monotonic()
        s2 = backup_paths(repo, [str(v2)], opts).stats
        t2 = time.monotonic() - t0
        data_chunks = sum(1 for _ in repo.index.iter_chunks())
        repo.close()
        index = du_alloc(work / f"cache-{name}")
        stored = du_alloc(work / f"repo-{name}")
        row = {
            "min": mn, "avg": avg, "max": mx, "default": (mn, avg, mx) == CDC_CONFIGS[2],
            "backup1_s": round(t1, 2), "backup1_MBps": round(v1_bytes / MB / t1, 1),
            "backup2_s": round(t2, 2), "backup2_MBps": round(v2_bytes / MB / t2, 1),
            "chunks_v1": s1["new_chunks"], "mean_chunk_large": cdc_bytes // max(1, cdc_n),
            "chunker_only_MBps": round(cdc_mbps, 1),
            "v2_new_bytes": s2["new_bytes"], "v2_new_stored": s2["stored_bytes"], "v2_new_chunks": s2["new_chunks"],
            "amplification": round(s2["new_bytes"] / changed, 2),
            "dedup_ratio_v2": round(v2_bytes / max(1, s2["new_bytes"]), 1),
            "index_entries": data_chunks, "index_bytes": index, "repo_bytes": stored,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        cleanup(work, name)
    return rows


# --- images --------------------------------------------------------------------------------------------
def write_image(repo: Repository, path: Path, cs: int) -> tuple[DiskRecord, dict[str, int], float]:
    size = path.stat().st_size
    writer = repo.writer()
    t0 = time.monotonic()
    with Pipeline() as pipe:
        iw = ImageWriter(repo, writer, pipe, "disk", size, chunk_size=cs)
        fd = os.open(path, os.O_RDONLY)
        try:
            for off, ln, is_data in data_extents(fd, size):
                if not is_data:
                    continue
                pos = off
                while pos < off + ln:
                    buf = os.pread(fd, min(4 * MiB, off + ln - pos), pos)
                    iw.write(pos, buf)
                    pos += len(buf)
        finally:
            os.close(fd)
        rec = iw.finish()
        pipe.drain()
        writer.flush()
    return rec, dict(writer.stats), time.monotonic() - t0


def random_reads(repo: Repository, rec: DiskRecord, n: int, cold: int, seed: int) -> dict[str, float]:
    reader = ImageReader(repo, rec, ChunkSource(repo, ChunkCache(max_bytes=0)))
    nchunks = (rec.size + rec.chunk_size - 1) // rec.chunk_size
    data_idx = [i for i in range(nchunks) if reader.entry(i) is not None]  # also loads every map page
    rng = random.Random(seed)
    offs = []
    for _ in range(n):
        idx = rng.choice(data_idx)
        offs.append(idx * rec.chunk_size + rng.randrange(0, min(rec.chunk_size, rec.size - idx * rec.chunk_size)) // 4096 * 4096)
    warm_t = []
    for off in offs:
        t0 = time.perf_counter()
        reader.read(off, 4096)
        warm_t.append(time.perf_counter() - t0)
    cold_t = []
    for off in offs[:cold]:
        if not drop_caches():
            break
        t0 = time.perf_counter()
        reader.read(off, 4096)
        cold_t.append(time.perf_counter() - t0)
    warm_t.sort()
    out = {"warm_median_ms": round(1000 * statistics.median(warm_t), 3),
           "warm_p95_ms": round(1000 * warm_t[int(0.95 * (len(warm_t) - 1))], 3)}
    if cold_t:
        out["cold_median_ms"] = round(1000 * statistics.median(cold_t), 2)
    return out


def image_study(work: Path, img1: Path, img2: Path, changed: int, reads: int, cold: int) -> list[dict[str, Any]]:
    rows = []
    alloc1 = img1.stat().st_blocks * 512
    alloc2 = img2.stat().st_blocks * 512
    for cs in IMAGE_SIZES:
        name = f"img-{cs // KiB}"
        repo = open_repo(work, name, image_chunk_size=cs)
        rec1, st1, t1 = write_image(repo, img1, cs)
        rec2, st2, t2 = write_image(repo, img2, cs)
        rr = random_reads(repo, rec2, reads, cold, cs)
        # Sequential read of the whole image (what a full disk restore does), no chunk cache.
        reader = ImageReader(repo, rec2, ChunkSource(repo, ChunkCache(max_bytes=0)))
        nchunks = (rec2.size + cs - 1) // cs
        t0 = time.monotonic()
        got = 0
        for i in range(nchunks):
            c = reader.read_chunk(i)
            got += len(c) if c is not None else 0
        tseq = time.monotonic() - t0
        entries = sum(1 for _ in repo.index.iter_chunks())
        repo.close()
        row = {
            "chunk_size": cs, "default": cs == 256 * KiB,
            "write_s": round(t1, 2), "write_MBps": round(alloc1 / MB / t1, 1),
            "data_chunks_v1": rec1.stats["data_chunks"], "zero_chunks_v1": rec1.stats["zero_chunks"],
            "map_pages": sum(1 for p in rec1.pages if p is not None),
            "v2_write_s": round(t2, 2), "v2_new_bytes": st2["new_bytes"], "v2_new_stored": st2["stored_bytes"],
            "amplification": round(st2["new_bytes"] / changed, 2),
            "stored_v1": st1["stored_bytes"],
            "index_entries": entries, "index_bytes": du_alloc(work / f"cache-{name}"),
            "seq_read_MBps": round(got / MB / tseq, 1), **rr,
            "alloc_v1": alloc1, "alloc_v2": alloc2,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        cleanup(work, name)
    return rows


# --- report --------------------------------------------------------------------------------------------
def report(raw: dict[str, Any]) -> str:
    mut = raw["mutation"]
    lines = [
        f"Dataset: {raw['v1_bytes'] / MB:,.0f} MB (v1), mutation changed {mut['changed_bytes'] / MB:,.1f} MB "
        f"(of which {raw['image_changed'] / MB:,.1f} MB inside the disk image). Threads: {raw['threads']}.",
        "",
        "File CDC (whole dataset, files cache off; 'added by v2' = plaintext bytes the mutated copy stored; "
        "amplification = added / really changed):",
        "",
        "| min / avg / max | FastCDC alone MB/s | backup1 MB/s | backup2 (dedup) MB/s | mean chunk (large/) "
        "| chunks (index entries) | index MB | added by v2 MB | amplification |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in raw["cdc"]:
        mark = " (default)" if r["default"] else ""
        lines.append(
            f"| {human(r['min'])} / {human(r['avg'])} / {human(r['max'])}{mark} | {r['chunker_only_MBps']:,.0f} | "
            f"{r['backup1_MBps']:.0f} | {r['backup2_MBps']:.0f} | {r['mean_chunk_large'] / KiB:,.0f} KiB | "
            f"{r['index_entries']:,} | "
            f"{r['index_bytes'] / MB:.1f} | {r['v2_new_bytes'] / MB:,.1f} | {r['amplification']:.2f} |"
        )
    lines += [
        "",
        f"Disk image ({raw['image_size'] / MiB:,.0f} MiB ext4, {raw['image_alloc'] / MB:,.0f} MB allocated; "
        f"{raw['image_changed'] / MB:.1f} MB changed inside it). Random read = one 4 KiB read at a random "
        "offset of a data chunk, no chunk cache; warm = pack data in the page cache (CPU cost: pread + AES-GCM + "
        "zstd of the whole chunk), cold = page cache dropped before the read:",
        "",
        "| chunk size | write MB/s | data chunks | map pages | added by v2 MB | amplification | 4K read warm "
        "median / p95 ms | 4K read cold median ms | sequential read MB/s (1 thread) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in raw["image"]:
        mark = " (default)" if r["default"] else ""
        lines.append(
            f"| {human(r['chunk_size'])}{mark} | {r['write_MBps']:.0f} | {r['data_chunks_v1']:,} | {r['map_pages']} | "
            f"{r['v2_new_bytes'] / MB:,.1f} | {r['amplification']:.2f} | {r['warm_median_ms']:.2f} / "
            f"{r['warm_p95_ms']:.2f} | {r.get('cold_median_ms', float('nan')):.2f} | {r['seq_read_MBps']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ihbbench/chunks"), help="scratch directory (wiped)")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--reads", type=int, default=300, help="random 4 KiB reads per image chunk size")
    ap.add_argument("--cold-reads", type=int, default=30, help="of which this many with a cold page cache")
    ap.add_argument("--skip-cdc", action="store_true")
    ap.add_argument("--skip-image", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    a = ap.parse_args(argv)
    if a.work.exists():
        shutil.rmtree(a.work)
    a.work.mkdir(parents=True)
    v1, v2 = a.work / "v1", a.work / "v2"
    print("generating v1 and v2 ...", flush=True)
    dataset.generate(v1, dataset.DEFAULT_SEED, a.scale)
    dataset.generate(v2, dataset.DEFAULT_SEED, a.scale)
    mut = dataset.mutate(v2)
    v1_bytes = dataset.tree_bytes(v1 / "data")
    v2_bytes = dataset.tree_bytes(v2 / "data")
    img1, img2 = v1 / "data/images/disk.img", v2 / "data/images/disk.img"
    image_changed = int(mut["changed"]["image changed"])  # type: ignore[index]
    warm(v1 / "data")
    warm(v2 / "data")
    from repo.workers import default_threads

    raw: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "scale": a.scale,
        "threads": default_threads(), "mutation": mut, "v1_bytes": v1_bytes, "v2_bytes": v2_bytes,
        "image_size": img1.stat().st_size, "image_alloc": img1.stat().st_blocks * 512, "image_changed": image_changed,
        "cdc": [], "image": [],
    }
    if not a.skip_image:
        raw["image"] = image_study(a.work, img1, img2, image_changed, a.reads, a.cold_reads)
        warm(v1 / "data")
        warm(v2 / "data")
    if not a.skip_cdc:
        raw["cdc"] = cdc_study(a.work, v1 / "data", v2 / "data", int(mut["changed_bytes"]), v1_bytes, v2_bytes)  # type: ignore[call-overload]
    md = report(raw)
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (a.out / f"chunks-{stamp}.md").write_text(md)
    (a.out / f"chunks-{stamp}.json").write_text(json.dumps(raw, indent=1) + "\n")
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)
    print()
    print(md)
    print(f"written to {a.out}/chunks-{stamp}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
