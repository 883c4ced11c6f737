"""ihb against borg and restic on the benchmark dataset, in one run.

    python bench/backup_bench.py [--work /tmp/ihbbench/run] [--tools ihb,borg,restic] [--repeat 3] [--scale 1.0]

Phases, each tool in turn, with the page cache dropped before every command (when permitted):

1. ``init`` - every peer encrypted: ihb AES-256-GCM (scrypt-wrapped key), borg ``repokey-blake2``
   (AES-CTR + BLAKE2b MAC), restic AES-256-CTR + Poly1305 (repository format 2, the one with compression);
2. ``backup1`` - first backup of DATASET/data: ihb zstd level 3 (its default), borg ``--compression zstd,3``,
   restic ``--compression auto`` (zstd "default" level of klauspost/compress, comparable to level 3);
3. ``mutate`` - bench/dataset.py changes ~5% of the data;
4. ``backup2`` - second backup (each tool's files cache / parent snapshot in use, as in daily operation);
5. ``restore`` - full restore of the latest backup into an empty directory (borg ``extract --sparse``,
   since ihb restores holes; restic 0.14 has no sparse restore), verified against the source by digest.

Measured per command: wall time (the command; a ``sync`` after it is timed separately), peak RSS and
CPU time from ``/usr/bin/time -v``, the CPU other processes used meanwhile (/proc/stat; on a shared machine
this says how far to trust a wall time); repository size (``du``, apparent bytes) after each backup; cache
size. ``--repeat N`` runs the whole sequence N times with the tool order rotated and reports the best and
median wall times. Writes bench/out/backup-<date>.md (tables) and .json (raw numbers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(HERE))

import dataset  # noqa: E402
from benchutil import byte_compile, drop_caches, hold_host_memory  # noqa: E402

PASSPHRASE = "bench-passphrase-not-secret"
MB = 1_000_000


@dataclass
class Measure:
    wall: float
    sync: float
    max_rss_kib: int
    user: float
    sys: float
    rc: int
    others_cores: float = 0.0  # CPU used by other processes during the command, in cores
    stdout_tail: str = ""


@dataclass
class ToolResult:
    tool: str
    version: str
    phases: dict[str, Measure] = field(default_factory=dict)
    repo_bytes: dict[str, int] = field(default_factory=dict)
    cache_bytes: dict[str, int] = field(default_factory=dict)
    restore_ok: bool | None = None
    notes: list[str] = field(default_factory=list)


# --- helpers -------------------------------------------------------------------------------------------
def du(path: Path) -> int:
    """Apparent bytes of a tree (packs and segments are never sparse)."""
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def busy_seconds() -> float:
    """CPU seconds all processes have used since boot (user+nice+system+irq+softirq+steal)."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], env: dict[str, str], cwd: Path | None, log: Path) -> Measure:
    tfile = log.with_suffix(".time")
    b0 = busy_seconds()
    t0 = time.monotonic()
    with open(log, "wb") as out:
        r = subprocess.run(["/usr/bin/time", "-v", "-o", str(tfile), *cmd], env=env, cwd=cwd, stdout=out,
                           stderr=subprocess.STDOUT)
    wall = time.monotonic() - t0
    busy = busy_seconds() - b0
    t1 = time.monotonic()
    subprocess.run(["sync"], check=True)
    sync = time.monotonic() - t1
    tv = tfile.read_text()

    def grab(label: str) -> str:
        m = re.search(rf"{re.escape(label)}: (\S+)", tv)
        return m.group(1) if m else "0"

    tail = log.read_bytes()[-2000:].decode(errors="replace")
    if r.returncode != 0:
        print(f"  ! {' '.join(cmd)} exited {r.returncode}:\n{tail}", file=sys.stderr)
    user, system = float(grab("User time (seconds)")), float(grab("System time (seconds)"))
    others = max(0.0, busy - user - system) / max(wall, 1e-9)
    return Measure(round(wall, 2), round(sync, 2), int(grab("Maximum resident set size (kbytes)")), user, system,
                   r.returncode, round(others, 2), tail[-500:])


def version_of(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


# --- tools ---------------------------------------------------------------------------------------------
class Tool:
    name = ""

    def __init__(self, work: Path, data: Path) -> None:
        self.work, self.data = work, data
        self.repo = work / f"repo-{self.name}"
        self.cache = work / f"cache-{self.name}"
        self.target = work / f"restore-{self.name}"
        self.env = dict(os.environ)

    def version(self) -> str:
        raise NotImplementedError

    def init(self) -> list[str]:
        raise NotImplementedError

    def backup(self, n: int) -> list[str]:
        raise NotImplementedError

    def restore(self) -> tuple[list[str], Path | None]:
        raise NotImplementedError

    def restored_data(self) -> Path:
        return self.target / str(self.data).lstrip("/")


class Ihb(Tool):
    name = "ihb"

    def __init__(self, work: Path, data: Path, threads: int | None) -> None:
        super().__init__(work, data)
        self.bin = str(PROJECT / ".venv" / "bin" / "ihb")
        self.env.update(IHB_PASSPHRASE=PASSPHRASE, IHB_REPO=str(self.repo), IHB_CACHE_DIR=str(self.cache))
        if threads:
            self.env["IHB_THREADS"] = str(threads)

    def version(self) -> str:
        rev = subprocess.run(["git", "-C", str(PROJECT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        return f"{version_of([self.bin, '--version']).split()[-1]} (git {rev} + working tree)"

    def init(self) -> list[str]:
        return [self.bin, "init"]

    def backup(self, n: int) -> list[str]:
        return [self.bin, "backup", "--json", "--host", "bench", "--tag", f"b{n}", str(self.data)]

    def restore(self) -> tuple[list[str], Path | None]:
        return [self.bin, "restore", "latest", str(self.target)], None


class Borg(Tool):
    name = "borg"

    def __init__(self, work: Path, data: Path) -> None:
        super().__init__(work, data)
        self.env.update(BORG_PASSPHRASE=PASSPHRASE, BORG_REPO=str(self.repo), BORG_BASE_DIR=str(self.cache),
                        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")

    def version(self) -> str:
        return version_of(["borg", "--version"])

    def init(self) -> list[str]:
        return ["borg", "init", "-e", "repokey-blake2"]

    def backup(self, n: int) -> list[str]:
        return ["borg", "create", "--compression", "zstd,3", f"::b{n}", str(self.data)]

    def restore(self) -> tuple[list[str], Path | None]:
        return ["borg", "extract", "--sparse", "::b2"], self.target


class Restic(Tool):
    name = "restic"

    def __init__(self, work: Path, data: Path) -> None:
        super().__init__(work, data)
        self.env.update(RESTIC_PASSWORD=PASSPHRASE, RESTIC_REPOSITORY=str(self.repo), RESTIC_CACHE_DIR=str(self.cache))

    def version(self) -> str:
        return version_of(["restic", "version"])

    def init(self) -> list[str]:
        return ["restic", "init", "--repository-version", "2"]

    def backup(self, n: int) -> list[str]:
        return ["restic", "backup", "--compression", "auto", "--host", "bench", "--tag", f"b{n}", str(self.data)]

    def restore(self) -> tuple[list[str], Path | None]:
        return ["restic", "restore", "latest", "--target", str(self.target)], None


# --- the run -------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", "/tmp"], capture_output=True,
                        text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "cpu": cpu, "mem_gib": round(mem / 2**30, 1), "kernel": platform.release(),
            "python": platform.python_version(), "os": _os_release(), "work_fs": fs}


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "?"


def run_once(work: Path, tools: list[str], scale: float, threads: int | None, drop: bool, keep: bool,
             rep: int) -> dict[str, Any]:
    """One complete sequence (fresh dataset and repositories); tools go in the given order in every phase."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    logs = work / "logs"
    logs.mkdir()
    ds_root = work / "dataset"
    print(f"[run {rep}] generating the dataset in {ds_root} (scale {scale}) ...", flush=True)
    ds = dataset.generate(ds_root, dataset.DEFAULT_SEED, scale)
    data = ds_root / "data"
    all_tools: dict[str, Tool] = {"ihb": Ihb(work, data, threads), "borg": Borg(work, data), "restic": Restic(work, data)}
    chosen = [all_tools[t] for t in tools]
    results = {t.name: ToolResult(t.name, t.version()) for t in chosen}
    dropped = True

    def phase(name: str, tool: Tool, cmd: list[str], cwd: Path | None = None) -> Measure:
        nonlocal dropped
        if drop:
            dropped = drop_caches() and dropped
        print(f"[run {rep}] [{name}] {tool.name}: {' '.join(cmd)}", flush=True)
        m = timed(cmd, tool.env, cwd, logs / f"{tool.name}-{name}.log")
        print(f"    {m.wall:.1f} s, CPU {m.user + m.sys:.1f} s, sync {m.sync:.1f} s, {m.max_rss_kib / 1024:.0f} MiB RSS, "
              f"other processes {m.others_cores:.2f} cores, rc {m.rc}", flush=True)
        results[tool.name].phases[name] = m
        return m

    for t in chosen:
        phase("init", t, t.init())
    for t in chosen:
        phase("backup1", t, t.backup(1))
        results[t.name].repo_bytes["backup1"] = du(t.repo)
        results[t.name].cache_bytes["backup1"] = du(t.cache)
    print(f"[run {rep}] mutating ~5% of the dataset ...", flush=True)
    mut = dataset.mutate(ds_root)
    for t in chosen:
        phase("backup2", t, t.backup(2))
        results[t.name].repo_bytes["backup2"] = du(t.repo)
        results[t.name].cache_bytes["backup2"] = du(t.cache)
    want = dataset.digest(data)
    for t in chosen:
        cmd, cwd = t.restore()
        if cwd is not None:
            cwd.mkdir(parents=True, exist_ok=True)
        phase("restore", t, cmd, cwd)
        got = dataset.digest(t.restored_data()) if t.restored_data().exists() else "missing"
        results[t.name].restore_ok = got == want
        if got != want:
            results[t.name].notes.append(f"restored tree differs from the source (digest {got[:16]} != {want[:16]})")
        if not keep:
            shutil.rmtree(t.target, ignore_errors=True)
    if not keep:
        for t in chosen:
            shutil.rmtree(t.repo, ignore_errors=True)
            shutil.rmtree(t.cache, ignore_errors=True)
        shutil.rmtree(ds_root, ignore_errors=True)
    return {"order": tools, "page_cache_dropped": drop and dropped, "dataset": ds, "mutation": mut,
            "tools": {k: asdict(v) for k, v in results.items()}}


def run_bench(work: Path, tools: list[str], scale: float, threads: int | None, drop: bool, keep: bool,
              repeat: int) -> dict[str, Any]:
    runs = []
    for rep in range(repeat):
        order = tools[rep % len(tools):] + tools[: rep % len(tools)]  # rotate who goes first
        runs.append(run_once(work, order, scale, threads, drop, keep and rep == repeat - 1, rep + 1))
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine(), "tools": tools,
            "runs": runs}


# --- report --------------------------------------------------------------------------------------------
PHASES = ("backup1", "backup2", "restore")


def summarize(raw: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per tool and phase over all runs: best and median wall time, CPU, peak RSS, other processes' load."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for tool in raw["tools"]:
        out[tool] = {}
        for ph in PHASES:
            ms = [r["tools"][tool]["phases"][ph] for r in raw["runs"] if ph in r["tools"][tool]["phases"]]
            if not ms:
                continue
            best = min(ms, key=lambda m: m["wall"])
            out[tool][ph] = {
                "best_wall": best["wall"], "median_wall": statistics.median(m["wall"] for m in ms),
                "walls": [m["wall"] for m in ms],
                "cpu": min(m["user"] + m["sys"] for m in ms), "rss_mib": max(m["max_rss_kib"] for m in ms) / 1024,
                "others_best": best["others_cores"], "others_median": statistics.median(m["others_cores"] for m in ms),
                "failed": any(m["rc"] != 0 for m in ms),
                "repo": raw["runs"][-1]["tools"][tool]["repo_bytes"].get(ph),
            }
    return out


def report(raw: dict[str, Any]) -> str:
    last = raw["runs"][-1]
    ds, mut, m = last["dataset"], last["mutation"], raw["machine"]
    data_b = int(ds["tree_bytes"])
    mut_b = int(mut["dataset_bytes"]) + int(mut["changed_bytes"])
    summ = summarize(raw)
    base = summ.get("ihb")
    n = len(raw["runs"])
    dropped = all(r["page_cache_dropped"] for r in raw["runs"])

    def ratio(v: float | None, ref: float | None) -> str:
        return f"{v / ref:.2f}x" if v and ref else "-"

    lines = [
        f"Machine: {m['cpus']} CPUs ({m['cpu']}), {m['mem_gib']} GiB RAM, {m['os']}, kernel {m['kernel']}, "
        f"Python {m['python']}, work on {m['work_fs']}. Page cache dropped before every command: "
        f"{'yes' if dropped else 'NO (not permitted)'}. {n} run(s), tool order rotated between runs.",
        "",
        f"Dataset: {data_b / MB:,.0f} MB of data ({int(ds['file_bytes']) / MB:,.0f} MB generated files, duplicates, "
        f"a {int(ds['image_size']) / 2**20:,.0f} MiB sparse ext4 image with {int(ds['image_allocated']) / MB:,.0f} MB "
        f"allocated); the mutation changed {int(mut['changed_bytes']) / MB:,.0f} MB "
        f"({100 * float(mut['changed_fraction']):.1f}%).",
        "",
        "Versions: " + "; ".join(f"{k} {last['tools'][k]['version']}" for k in raw["tools"]) + ".",
        "",
        "| phase | tool | best wall s | median wall s | MB/s (best) | time vs ihb | CPU s | peak RSS MiB "
        "| other load (cores) | repo MB | repo vs ihb |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ph, nbytes in (("backup1", data_b), ("backup2", mut_b), ("restore", mut_b)):
        for name in raw["tools"]:
            p = summ[name].get(ph)
            if not p:
                continue
            ref = base[ph]["best_wall"] if base and ph in base else None
            ref_repo = base[ph]["repo"] if base and ph in base else None
            flag = " (FAILED)" if p["failed"] else ""
            if ph == "restore" and any(r["tools"][name]["restore_ok"] is False for r in raw["runs"]):
                flag += " (MISMATCH)"
            repo = p["repo"]
            lines.append(
                f"| {ph} | {name}{flag} | {p['best_wall']:.1f} | {p['median_wall']:.1f} | "
                f"{nbytes / MB / max(p['best_wall'], 1e-9):,.0f} | {ratio(p['best_wall'], ref)} | {p['cpu']:.1f} | "
                f"{p['rss_mib']:,.0f} | {p['others_best']:.2f} | {'' if repo is None else f'{repo / MB:,.0f}'} | "
                f"{'' if repo is None else ratio(repo, ref_repo)} |"
            )
    lines += [
        "",
        "MB/s = dataset bytes (sparse image counted by its allocated size) / best wall time; backup2 and restore "
        "use the mutated dataset's size. 'time vs ihb' (best walls) > 1 means ihb is faster; 'repo vs ihb' > 1 "
        "means ihb's repository is smaller. CPU s = least user+sys over the runs. 'other load' = CPU cores used "
        "by other processes during the best run (the machine is shared). Wall time excludes the `sync` after "
        "each command (in the JSON).",
        "",
        "Cache/index sizes after backup2 (MB): "
        + ", ".join(f"{k} {last['tools'][k]['cache_bytes'].get('backup2', 0) / MB:,.0f}" for k in raw["tools"]) + ".",
        "Restores verified against the source by content digest: "
        + ", ".join(f"{k} {'ok' if all(r['tools'][k]['restore_ok'] for r in raw['runs']) else 'FAILED'}"
                    for k in raw["tools"]) + ".",
        "",
        "All wall times (s): " + "; ".join(f"{k} {ph} {summ[k][ph]['walls']}" for k in raw["tools"] for ph in PHASES
                                           if ph in summ[k]) + ".",
    ]
    for r in raw["runs"]:
        for k, v in r["tools"].items():
            for note in v["notes"]:
                lines.append(f"- {k}: {note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    byte_compile()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ihbbench/run"), help="scratch directory (wiped)")
    ap.add_argument("--tools", default="ihb,borg,restic")
    ap.add_argument("--scale", type=float, default=1.0, help="dataset scale (1.0 = ~2 GB + 1 GiB image)")
    ap.add_argument("--repeat", type=int, default=1, help="complete runs; the table shows the best and median")
    ap.add_argument("--threads", type=int, default=None, help="IHB_THREADS for ihb (default: its own)")
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep dataset, repositories and restores of the last run")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    a = ap.parse_args(argv)
    print(hold_host_memory(), file=sys.stderr, flush=True)
    for needed in ("/usr/bin/time", "mkfs.ext4", "debugfs"):
        if not shutil.which(needed):
            raise SystemExit(f"{needed} is missing (apt-get install time e2fsprogs)")
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    raw = run_bench(a.work, tools, a.scale, a.threads, not a.no_drop_caches, a.keep, max(1, a.repeat))
    raw["summary"] = summarize(raw)
    md = report(raw)
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (a.out / f"backup-{stamp}.md").write_text(md)
    (a.out / f"backup-{stamp}.json").write_text(json.dumps(raw, indent=1) + "\n")
    print()
    print(md)
    print(f"written to {a.out}/backup-{stamp}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
