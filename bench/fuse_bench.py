"""FUSE read benchmark: `ihb mount` against `borg mount`, `restic mount` and a no-work pyfuse3 ceiling.

In one run, on the same data: sequential reads of a 1 GiB VM image and of a 1 GiB file, cold (fresh
mount, page cache dropped: the repository comes from disk), with the repository in the page cache (a
fresh mount, so this measures FUSE + decryption + decompression, comparable with the ceiling) and
warm (read again through the same mount); 4 KiB random-read latency on the image, cold
(p50/p99, what a VM booting from the mount sees); `find | wc -l` over a 100,000-file tree; and the
ceiling (bench/fuse_ceiling.py) mounted with ihb's options. Prints a markdown table, the CPU each read
cost the whole machine, and the bound this machine puts on any mount of an encrypted repository
(``machine_bounds``: the ceiling's CPU per GB plus decryption and page-cache copies, the disk's rate).

For ihb the image is an image restore point (vms/VM/TIME/disk0.raw, fixed 256 KiB chunks, or
--image-chunk-size: 65536 is what `ihb vm backup` stores); borg
and restic have no image restore points, so for them it is the same bytes backed up as a file. All
data is random (incompressible) so compression helps nobody. Every tool runs with its defaults.

    sudo .venv/bin/python bench/fuse_bench.py [--workdir /var/tmp/ihb-bench] [--size-mib 1024]
        [--files 100000] [--tools ceiling,ihb,borg,restic] [--keep [--reuse]]

Root is needed to drop the page cache between cold runs (and for ihb to raise the mount's read-ahead).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import busy_cpu_seconds, byte_compile, drop_caches, hold_host_memory  # noqa: E402

from fusefs.mount import mount_entry  # noqa: E402

MiB = 1024 * 1024
PASS = "bench-passphrase"
Row = dict[str, Any]


# --- measurements ---------------------------------------------------------------------------------------
def seq_read(path: Path) -> tuple[float, float]:
    """MB/s reading the whole file with 1 MiB reads, and what it cost the whole machine in CPU seconds
    per GB (the reader, the filesystem's process and the kernel: all of it competes for the same cores)."""
    buf = bytearray(MiB)
    mv = memoryview(buf)
    total = 0
    c0 = busy_cpu_seconds()
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(mv)
            if not n:
                break
            total += n
    dt = time.perf_counter() - t0
    return total / dt / 1e6, (busy_cpu_seconds() - c0) / (total / 1e9)


def random_latency(path: Path, count: int, seed: int = 1) -> tuple[float, float]:
    """p50 and p99 in ms of 4 KiB reads at random 4 KiB-aligned offsets (readahead off)."""
    size = os.stat(path).st_size
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDONLY)
    lat = []
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for _ in range(count):
            off = rng.randrange(0, size // 4096) * 4096
            t0 = time.perf_counter()
            os.pread(fd, 4096, off)
            lat.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
    lat.sort()
    return statistics.median(lat), lat[int(len(lat) * 0.99) - 1]


def prewarm(work: Path, skip: Path) -> None:
    """Read every file of a tool's repository and caches (index included) once, so a read through a
    fresh mount measures the filesystem (FUSE, decryption, decompression) rather than the disk."""
    buf = bytearray(4 * MiB)
    for dirpath, dirs, files in os.walk(work):
        dirs[:] = [d for d in dirs if Path(dirpath, d) != skip]  # never through the mount itself
        for fn in files:
            with open(os.path.join(dirpath, fn), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def find_count(path: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = subprocess.run(f"find '{path}' | wc -l", shell=True, capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - t0, int(out.strip())


def machine_bounds(repo: Path, ceiling: Row) -> Row:
    """What any filesystem serving this repository's bytes could reach on this machine, measured here.

    A read through a mount of an encrypted repository costs at least what the no-work ceiling costs per
    GB (FUSE, the kernel, the reader: measured machine-wide during its reads), plus decrypting
    (AES-256-GCM with the repository's own code, one thread) and copying the packs out of the page cache;
    cold, the packs also come from the disk. With every core busy all the time, that bounds the rate.
    """
    from repo.crypto import Aead

    packs = sorted(p for p in (repo / "data").rglob("*") if p.is_file())
    buf = bytearray(MiB)
    mv = memoryview(buf)

    def read_all() -> tuple[int, float, float]:
        total, c0, t0 = 0, time.thread_time(), time.perf_counter()
        for p in packs:
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(mv):
                    total += n
        return total, time.perf_counter() - t0, time.thread_time() - c0

    drop_caches()
    total, dt, _ = read_all()
    disk = total / dt / 1e6
    total, _, cpu = read_all()
    copy = cpu / (total / 1e9)
    blob = 256 * 1024
    aead, nonce = Aead(os.urandom(32)), os.urandom(12)
    sealed = aead.seal(nonce, os.urandom(blob), b"aad")
    out = memoryview(bytearray(blob))
    c0 = time.thread_time()
    for _ in range(4096):  # 1 GiB
        aead.open_into(nonce, sealed, b"aad", out)
    decrypt = (time.thread_time() - c0) / (4096 * blob / 1e9)
    cores = os.cpu_count() or 1
    r: Row = {"disk": disk, "copy_cpu": copy, "decrypt_cpu": decrypt, "cores": cores}
    for what in ("image", "file"):
        need = ceiling[f"{what}_hot_cpu"] + copy + decrypt
        r[f"{what}_need_cpu"] = need
        r[f"{what}_hot"] = min(ceiling[f"{what}_hot"], cores / need * 1000)
        r[f"{what}_cold"] = min(r[f"{what}_hot"], disk)
    return r


def bounds_text(b: Row, ceiling: Row) -> str:
    lines = [f"Bound on this machine ({b['cores']} cores), measured in this run: a read through any mount of an "
             f"encrypted repository costs at least the ceiling's CPU per GB plus decrypting "
             f"({b['decrypt_cpu']:.2f} CPU-s/GB, AES-256-GCM, one thread) plus copying the packs out of the page "
             f"cache ({b['copy_cpu']:.2f}); cold, the disk streams the packs at {b['disk']:.0f} MB/s."]
    for what in ("image", "file"):
        lines.append(f"- {what}: ceiling {ceiling[f'{what}_hot_cpu']:.2f} + {b['copy_cpu']:.2f} + {b['decrypt_cpu']:.2f} = "
                     f"{b[f'{what}_need_cpu']:.2f} CPU-s/GB -> at most {b[f'{what}_hot']:.0f} MB/s with the repository "
                     f"cached ({100 * b[f'{what}_hot'] / ceiling[f'{what}_hot']:.0f}% of the ceiling), "
                     f"{b[f'{what}_cold']:.0f} MB/s cold ({100 * b[f'{what}_cold'] / ceiling[f'{what}_cold']:.0f}%); "
                     "target 70%.")
    return "\n".join(lines)


# --- data -------------------------------------------------------------------------------------------------
def make_data(work: Path, size: int, files: int) -> Path:
    src = work / "src"
    marker = src / f".done-{size}-{files}"
    if marker.exists():
        return src
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for name, seed in (("file.bin", 1), ("disk.raw", 2)):
        rng = random.Random(seed)
        with open(src / name, "wb") as f:
            for _ in range(size // (16 * MiB)):
                f.write(rng.randbytes(16 * MiB))
    rng = random.Random(3)
    per_dir = 1000
    for d in range((files + per_dir - 1) // per_dir):
        sub = src / "tree" / f"d{d:04d}"
        sub.mkdir(parents=True)
        for i in range(min(per_dir, files - d * per_dir)):
            (sub / f"f{i:05d}").write_bytes(rng.randbytes(rng.randrange(0, 200)))
    marker.touch()
    return src


def run(cmd: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, **kw)
    if res.returncode not in (0, 1):  # 1: warnings (borg, ihb)
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res


def wait_mounted(mp: Path, proc: subprocess.Popen[bytes] | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mount_entry(str(mp)) is not None:
            os.listdir(mp)
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount process for {mp} exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{mp} not mounted after {timeout} s")


def wait_unmounted(mp: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while mount_entry(str(mp)) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


# --- the tools ----------------------------------------------------------------------------------------------
class Tool:
    name = ""

    def __init__(self, work: Path, src: Path) -> None:
        self.work = work / self.name
        self.src = src
        self.mp = self.work / "mnt"

    def setup(self) -> dict[str, float]:
        raise NotImplementedError

    @contextmanager
    def mounted(self) -> Any:
        raise NotImplementedError
        yield

    def paths(self) -> dict[str, Path]:
        raise NotImplementedError


class Ihb(Tool):
    name = "ihb"
    image_chunk_size = 0  # 0: the repository's default (256 KiB); `ihb vm backup` stores 64 KiB chunks

    def env(self) -> dict[str, str]:
        return {"IHB_REPO": str(self.work / "repo"), "IHB_PASSPHRASE": PASS, "IHB_CACHE_DIR": str(self.work / "cache"),
                "IHB_CONFIG_DIR": str(self.work / "etc"), "IHB_DATA_DIR": str(self.work / "data")}

    def ihb(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run([sys.executable, "-m", "appliance.cli", *args], env=self.env(), cwd=ROOT)

    def setup(self) -> dict[str, float]:
        shutil.rmtree(self.work, ignore_errors=True)
        self.mp.mkdir(parents=True)
        self.ihb("init")
        t0 = time.perf_counter()
        self.ihb("backup", "--host", "bench", str(self.src / "file.bin"), str(self.src / "disk.raw"),
                 str(self.src / "tree"))
        t_files = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._store_image()
        return {"backup": t_files, "image backup": time.perf_counter() - t0}

    def _store_image(self) -> None:
        from repo.image import ImageWriter
        from repo.repository import Repository
        from repo.snapshot import Snapshot
        from repo.workers import Pipeline

        path = self.src / "disk.raw"
        size = os.stat(path).st_size
        with Repository.open(str(self.work / "repo"), lambda: PASS.encode(), cache_dir=str(self.work / "cache")) as repo:
            writer = repo.writer()
            with Pipeline() as pipe, open(path, "rb") as f:
                iw = ImageWriter(repo, writer, pipe, "disk0", size, chunk_size=self.image_chunk_size or None)
                off = 0
                while chunk := f.read(4 * MiB):
                    iw.write(off, chunk)
                    off += len(chunk)
                rec = iw.finish()
                pipe.drain()
            writer.flush()
            repo.store_snapshot(Snapshot(id="", kind="image", host="hv", time_ns=time.time_ns(), disks=[rec],
                                         meta={"vm": "bench-vm"}))

    @contextmanager
    def mounted(self) -> Any:
        self.ihb("mount", str(self.mp))
        try:
            wait_mounted(self.mp)
            yield
        finally:
            self.ihb("umount", str(self.mp))
            wait_unmounted(self.mp)

    def paths(self) -> dict[str, Path]:
        files = self.mp / "by-host" / "bench" / "latest" / str(self.src).lstrip("/")
        return {"image": self.mp / "vms" / "bench-vm" / "latest" / "disk0.raw", "file": files / "file.bin",
                "tree": files / "tree"}


class Borg(Tool):
    name = "borg"

    def __init__(self, work: Path, src: Path) -> None:
        super().__init__(work, src)
        self.env = {"BORG_PASSPHRASE": PASS, "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes", "BORG_BASE_DIR": str(self.work / "home")}

    def setup(self) -> dict[str, float]:
        shutil.rmtree(self.work, ignore_errors=True)
        self.mp.mkdir(parents=True)
        run(["borg", "init", "--encryption=repokey-blake2", str(self.work / "repo")], env=self.env)
        t0 = time.perf_counter()
        run(["borg", "create", f"{self.work / 'repo'}::bench", str(self.src / "file.bin"), str(self.src / "disk.raw"),
             str(self.src / "tree")], env=self.env)
        return {"backup": time.perf_counter() - t0}

    @contextmanager
    def mounted(self) -> Any:
        run(["borg", "mount", f"{self.work / 'repo'}::bench", str(self.mp)], env=self.env)
        try:
            wait_mounted(self.mp)
            yield
        finally:
            run(["borg", "umount", str(self.mp)], env=self.env)
            wait_unmounted(self.mp)

    def paths(self) -> dict[str, Path]:
        base = self.mp / str(self.src).lstrip("/")
        return {"image": base / "disk.raw", "file": base / "file.bin", "tree": base / "tree"}


class Restic(Tool):
    name = "restic"

    def __init__(self, work: Path, src: Path) -> None:
        super().__init__(work, src)
        self.env = {"RESTIC_PASSWORD": PASS, "RESTIC_CACHE_DIR": str(self.work / "cache")}

    def setup(self) -> dict[str, float]:
        shutil.rmtree(self.work, ignore_errors=True)
        self.mp.mkdir(parents=True)
        repo = str(self.work / "repo")
        run(["restic", "-r", repo, "init"], env=self.env)
        t0 = time.perf_counter()
        run(["restic", "-r", repo, "backup", str(self.src / "file.bin"), str(self.src / "disk.raw"),
             str(self.src / "tree")], env=self.env)
        return {"backup": time.perf_counter() - t0}

    @contextmanager
    def mounted(self) -> Any:
        proc = subprocess.Popen(["restic", "-r", str(self.work / "repo"), "mount", str(self.mp)],
                                env={**os.environ, **self.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_mounted(self.mp, proc)
            yield
        finally:
            subprocess.run(["fusermount3", "-u", str(self.mp)], capture_output=True)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            wait_unmounted(self.mp)

    def paths(self) -> dict[str, Path]:
        base = self.mp / "snapshots" / "latest" / str(self.src).lstrip("/")
        return {"image": base / "disk.raw", "file": base / "file.bin", "tree": base / "tree"}


class Ceiling(Tool):
    name = "ceiling"

    def setup(self) -> dict[str, float]:
        shutil.rmtree(self.work, ignore_errors=True)
        self.mp.mkdir(parents=True)
        self.size = os.stat(self.src / "file.bin").st_size
        return {}

    @contextmanager
    def mounted(self) -> Any:
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fuse_ceiling.py"), str(self.mp), "--size",
                                 str(self.size)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            wait_mounted(self.mp, proc)
            yield
        finally:
            subprocess.run(["fusermount3", "-u", str(self.mp)], capture_output=True)
            proc.wait(30)
            wait_unmounted(self.mp)

    def paths(self) -> dict[str, Path]:
        return {"image": self.mp / "data", "file": self.mp / "data"}


# --- the run ----------------------------------------------------------------------------------------------
def measure(tool: Tool, random_reads: int, log: Callable[[str], None]) -> Row:
    r: Row = {}
    p = tool.paths()
    with tool.mounted():
        drop_caches()
        r["rand_p50"], r["rand_p99"] = random_latency(p["image"], random_reads)
    log(f"{tool.name}: random 4 KiB p50 {r['rand_p50']:.2f} ms p99 {r['rand_p99']:.2f} ms")
    for what in ("image", "file"):
        with tool.mounted():
            drop_caches()
            r[f"{what}_cold"], r[f"{what}_cold_cpu"] = seq_read(p[what])
            r[f"{what}_warm"], _ = seq_read(p[what])
        with tool.mounted():
            drop_caches()
            prewarm(tool.work, tool.mp)
            r[f"{what}_hot"], r[f"{what}_hot_cpu"] = seq_read(p[what])
        log(f"{tool.name}: {what} cold {r[f'{what}_cold']:.0f} MB/s, repository cached {r[f'{what}_hot']:.0f} MB/s, "
            f"warm {r[f'{what}_warm']:.0f} MB/s")
    if "tree" in p:
        with tool.mounted():
            drop_caches()
            r["find_cold"], n = find_count(p["tree"])
            r["find_warm"], _ = find_count(p["tree"])
            r["find_n"] = n
        log(f"{tool.name}: find {n} entries cold {r['find_cold']:.2f} s, warm {r['find_warm']:.2f} s")
    return r


def table(results: dict[str, Row], setup: dict[str, dict[str, float]], size_mib: int, files: int) -> str:
    tools = [t for t in ("ceiling", "ihb", "borg", "restic") if t in results]

    def cell(t: str, key: str, fmt: str) -> str:
        v = results[t].get(key)
        return "—" if v is None else fmt.format(v)

    def pct(key: str) -> str:
        if "ceiling" in results and "ihb" in results and results["ceiling"].get(key):
            return f"{100 * results['ihb'][key] / results['ceiling'][key]:.0f}%"
        return "—"

    rows = [
        ("sequential read, image, cold (MB/s)", "image_cold", "{:.0f}", True),
        ("sequential read, image, fresh mount, repository in page cache (MB/s)", "image_hot", "{:.0f}", True),
        ("sequential read, image, warm (MB/s)", "image_warm", "{:.0f}", True),
        ("sequential read, file, cold (MB/s)", "file_cold", "{:.0f}", True),
        ("sequential read, file, fresh mount, repository in page cache (MB/s)", "file_hot", "{:.0f}", True),
        ("sequential read, file, warm (MB/s)", "file_warm", "{:.0f}", True),
        ("machine CPU per GB read, image, repository in page cache (CPU-s)", "image_hot_cpu", "{:.2f}", False),
        ("machine CPU per GB read, file, repository in page cache (CPU-s)", "file_hot_cpu", "{:.2f}", False),
        ("4 KiB random read, cold, p50 (ms)", "rand_p50", "{:.2f}", False),
        ("4 KiB random read, cold, p99 (ms)", "rand_p99", "{:.2f}", False),
        (f"`find | wc -l`, {files:,} files, cold (s)", "find_cold", "{:.2f}", False),
        (f"`find | wc -l`, {files:,} files, warm (s)", "find_warm", "{:.2f}", False),
    ]
    head = "| " + " | ".join(["measurement", *tools, "ihb / ceiling"]) + " |"
    lines = [head, "|" + "---|" * (len(tools) + 2)]
    for label, key, fmt, ratio in rows:
        lines.append("| " + " | ".join([label, *(cell(t, key, fmt) for t in tools), pct(key) if ratio else ""]) + " |")
    backups = ", ".join(f"{t} {v['backup']:.1f} s" for t, v in setup.items() if "backup" in v) or "reused"
    lines.append("")
    lines.append(f"Data: {size_mib} MiB image + {size_mib} MiB file (random bytes), {files:,} small files. "
                 f"Backup times (file + image-as-file + tree): {backups}; ihb image restore point "
                 f"{setup.get('ihb', {}).get('image backup', 0):.1f} s.")
    return "\n".join(lines)


def main() -> None:
    byte_compile()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/var/tmp/ihb-bench")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--random-reads", type=int, default=2000)
    ap.add_argument("--tools", default="ceiling,ihb,borg,restic")
    ap.add_argument("--image-chunk-size", type=int, default=0,
                    help="ihb's image chunk size (default: the repository's, 256 KiB; VM backups use 65536)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (data is reused next run)")
    ap.add_argument("--reuse", action="store_true", help="with --keep: reuse the repositories of the last run")
    args = ap.parse_args()
    print(hold_host_memory(), file=sys.stderr, flush=True)
    Ihb.image_chunk_size = args.image_chunk_size
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if os.geteuid() != 0:
        log("not root: cold runs cannot drop the page cache and ihb cannot raise the mount read-ahead")
    log("preparing data")
    src = make_data(work, args.size_mib * MiB, args.files)
    classes = {"ihb": Ihb, "borg": Borg, "restic": Restic, "ceiling": Ceiling}
    results: dict[str, Row] = {}
    setup: dict[str, dict[str, float]] = {}
    bounds: Row = {}
    for name in args.tools.split(","):
        if name == "borg" and shutil.which("borg") is None or name == "restic" and shutil.which("restic") is None:
            log(f"{name} is not installed; skipped")
            continue
        tool = classes[name](work, src)
        if args.reuse and (tool.work / "repo").exists():
            log(f"{name}: reusing the repository of an earlier --keep run")
            tool.mp.mkdir(parents=True, exist_ok=True)
        else:
            log(f"{name}: backing up")
            setup[name] = tool.setup()
        results[name] = measure(tool, args.random_reads, log)
        if name == "ihb" and "ceiling" in results:  # before the repository is removed below
            bounds = machine_bounds(tool.work / "repo", results["ceiling"])
        if not args.keep:
            shutil.rmtree(tool.work, ignore_errors=True)
    print(table(results, setup, args.size_mib, args.files))
    if bounds:
        print()
        print(bounds_text(bounds, results["ceiling"]))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
