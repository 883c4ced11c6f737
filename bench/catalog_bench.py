"""The catalog at 10 million entries: build time, size, and the time of `ihb find` / `ihb versions` queries.

    python bench/catalog_bench.py [--work /tmp/ihb-catbench] [--shape history|distinct|both] [--entries 10000000]

Two synthetic shapes, both exactly ``--entries`` catalogued (restore point, path) entries, fed through
the same ``Catalog.add`` the backups use (no repository data is written, only the LMDB index):

* ``history``: 40 hosts x 50 restore points x 5,000 files; between two restore points 2 % of the files
  change (new size/mtime/digest) and 0.5 % are replaced by new names. The everyday shape: the same
  files seen again and again.
* ``distinct``: 10 hosts x 1 restore point x 1,000,000 files, every entry a different path - the worst
  case for the catalog's size (no run sharing at all), with 1.5 million distinct base names.

Names: half from a vocabulary of 20,000 common names (``nginx.conf``, ``index.html``, ...), half unique
(``img_83a1f0.jpg``, mail and cache files), in directories four to six levels deep; every host has
``/etc/nginx/nginx.conf``. Queries run once cold (fresh process state, LMDB file in the page cache as
after any recent use) and then best of 5; ``limit`` 1000 as the CLI's default.

Results are printed and written to bench/out/catalog-<date>.json.

Measured 2026-11-24 (2 vCPU VM, virtio disk, a page cache that keeps almost nothing: "first" is the
first query of a fresh process reading the index from disk; "best" the best of 5 after it), in ms:

| query (limit 1000)                  | history first | history best | distinct first | distinct best |
|-------------------------------------|--------------:|-------------:|---------------:|--------------:|
| find nginx.conf                     |            69 |          1.7 |            188 |           1.4 |
| find nginx.conf --host host007      |           0.4 |          0.1 |            0.7 |           0.4 |
| find 'nginx*'                       |           3.9 |          3.0 |            4.1 |           1.5 |
| find '*.conf' (1000 results)        |           545 |           30 |           1347 |            28 |
| find '*ginx*' (scans all names)     |            18 |          4.1 |            320 |            83 |
| find /etc/nginx/                    |            32 |          1.5 |             10 |           0.1 |
| find '/etc/*/nginx.conf'            |           2.1 |          1.4 |            0.9 |           0.3 |
| find 'msg-1f*' --since              |            32 |          1.1 |            0.1 |           0.0 |
| versions host007:/etc/nginx/...     |           0.2 |          0.0 |            0.0 |           0.0 |

Build: history 231 s, index 101 MiB (runs share unchanged files); distinct 871 s, 3.3 GiB (worst case).
The one query above a second is a broad suffix glob returning 1000 hits from the cold 3.3 GiB worst-case
catalog: ~4 random 4 KiB page reads per hit on this disk (the index is mapped for random access).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from repo.catalog import Catalog  # noqa: E402
from repo.index import Index  # noqa: E402
from repo.snapshot import Snapshot  # noqa: E402

EXTS = [".conf", ".html", ".js", ".py", ".txt", ".log", ".json", ".so", ".h", ".c", ".md", ".xml", ".png", ".jpg"]
WORDS = ["index", "main", "config", "default", "readme", "setup", "util", "app", "server", "client", "test",
         "data", "style", "module", "package", "cache", "init", "base", "core", "common", "error", "user", "admin",
         "site", "page", "table", "image", "logo", "font", "lib", "api", "auth", "db", "mail", "queue", "worker"]


def vocabulary(n: int, rnd: random.Random) -> list[str]:
    out = {"nginx.conf", "sshd_config", "passwd", "hosts", "fstab"}
    while len(out) < n:
        w = rnd.choice(WORDS) + (rnd.choice(["", "_", "-"]) + rnd.choice(WORDS) if rnd.random() < 0.7 else "")
        if rnd.random() < 0.3:
            w += str(rnd.randrange(100))
        out.add(w + rnd.choice(EXTS))
    return sorted(out)


class Gen:
    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.vocab = vocabulary(20000, self.rnd)
        self.dirs = ["/" + "/".join(f"{self.rnd.choice(WORDS)}{self.rnd.randrange(50)}" for _ in range(self.rnd.randint(3, 5)))
                     for _ in range(4000)]
        self.uniq = 0

    def name(self) -> str:
        if self.rnd.random() < 0.5:
            return self.rnd.choice(self.vocab)
        self.uniq += 1
        return f"{self.rnd.choice(['img_', 'msg-', 'cache.', 'tmp', 'part-'])}{self.uniq:x}{self.rnd.choice(EXTS)}"

    def path(self) -> bytes:
        return f"{self.rnd.choice(self.dirs)}/{self.name()}".encode()

    def attrs(self) -> tuple[int, int, bytes]:
        return self.rnd.randrange(1 << 20), 1_700_000_000_000_000_000 + self.rnd.randrange(10**15), self.rnd.randbytes(16)


def snap(host: str, t: int, i: int) -> Snapshot:
    sid = f"{hash((host, i)) & (2**256 - 1):064x}"
    return Snapshot(id=sid, kind="files", host=host, time_ns=t, paths=["/"], meta={"tenant": "t" + host[-1]})


def build_history(cat: Catalog, total: int) -> dict[str, Any]:
    hosts, points = 40, 50
    files = total // (hosts * points)
    g = Gen(1)
    t0 = time.monotonic()
    n = 0
    for h in range(hosts):
        host = f"host{h:03d}"
        state: dict[bytes, tuple[int, int, bytes]] = {b"/etc/nginx/nginx.conf": g.attrs()}
        while len(state) < files:
            state[g.path()] = g.attrs()
        for i in range(points):
            if i:
                keys = list(state)
                for k in g.rnd.sample(keys, files // 50):
                    state[k] = g.attrs()
                for k in g.rnd.sample(keys, files // 200):
                    if k != b"/etc/nginx/nginx.conf":
                        del state[k]
                        state[g.path()] = g.attrs()
            entries: Iterator[tuple[Any, ...]] = ((p, a[0], a[1], a[2], "f") for p, a in state.items())
            n += cat.add(snap(host, 1_700_000_000_000_000_000 + i * 86400 * 10**9, h * 1000 + i), entries)
        print(f"  host {h + 1}/{hosts}: {n:,} entries, {time.monotonic() - t0:.0f} s", flush=True)
    return {"entries": n, "build_seconds": round(time.monotonic() - t0, 1)}


def build_distinct(cat: Catalog, total: int) -> dict[str, Any]:
    hosts = 10
    files = total // hosts
    g = Gen(2)
    t0 = time.monotonic()
    n = 0
    for h in range(hosts):
        host = f"host{h:03d}"
        seen: set[bytes] = set()

        def entries(seen: set[bytes] = seen) -> Iterator[tuple[Any, ...]]:
            yield b"/etc/nginx/nginx.conf", 1000, 1, b"x" * 16, "f"
            c = 1
            while c < files:
                p = g.path()
                if p in seen:
                    continue
                seen.add(p)
                a = g.attrs()
                c += 1
                yield p, a[0], a[1], a[2], "f"

        n += cat.add(snap(host, 1_700_000_000_000_000_000 + h, h), entries())
        print(f"  host {h + 1}/{hosts}: {n:,} entries, {time.monotonic() - t0:.0f} s", flush=True)
    return {"entries": n, "build_seconds": round(time.monotonic() - t0, 1)}


QUERIES: list[tuple[str, dict[str, Any]]] = [
    ("find nginx.conf", {"pattern": "nginx.conf"}),
    ("find nginx.conf --host host007", {"pattern": "nginx.conf", "host": "host007"}),
    ("find 'nginx*'", {"pattern": "nginx*"}),
    ("find '*.conf' (limit 1000)", {"pattern": "*.conf"}),
    ("find '*ginx*' (scans names)", {"pattern": "*ginx*"}),
    ("find /etc/nginx/", {"pattern": "/etc/nginx/"}),
    ("find '/etc/*/nginx.conf'", {"pattern": "/etc/*/nginx.conf"}),
    ("find 'msg-1f*' --since", {"pattern": "msg-1f*", "since_ns": 1_700_000_000_000_000_000 + 40 * 86400 * 10**9}),
]


def run_queries(index_dir: str) -> list[dict[str, Any]]:
    out = []
    idx = Index(index_dir, "bench")
    cat = Catalog(idx)
    for label, kw in [*QUERIES, ("versions host007:/etc/nginx/nginx.conf", {})]:
        def q(kw: dict[str, Any] = kw, label: str = label) -> int:
            if label.startswith("versions"):
                return len(cat.versions("host007", "/etc/nginx/nginx.conf"))
            r = cat.find(limit=1000, **kw)
            return len(r.hits)
        t = time.perf_counter()
        hits = q()
        cold = time.perf_counter() - t
        best = min(_timed(q) for _ in range(5))
        out.append({"query": label, "results": hits, "first_ms": round(cold * 1000, 1), "best_ms": round(best * 1000, 1)})
        print(f"  {label:45} {hits:6} results  first {cold * 1000:7.1f} ms  best {best * 1000:7.1f} ms", flush=True)
    st = cat.stats()
    idx.close()
    out.append({"stats": st})
    return out


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/ihb-catbench")
    ap.add_argument("--shape", choices=["history", "distinct", "both"], default="both")
    ap.add_argument("--entries", type=int, default=10_000_000)
    ap.add_argument("--keep", action="store_true", help="keep the index for later query runs")
    ap.add_argument("--queries-only", action="store_true", help="query an index kept by an earlier --keep run")
    a = ap.parse_args()
    results: dict[str, Any] = {"entries": a.entries, "python": sys.version.split()[0], "cpus": os.cpu_count()}
    for shape in (["history", "distinct"] if a.shape == "both" else [a.shape]):
        d = os.path.join(a.work, shape)
        print(f"{shape}: {a.entries:,} entries in {d}", flush=True)
        if not a.queries_only:
            shutil.rmtree(d, ignore_errors=True)
            idx = Index(d, "bench")
            cat = Catalog(idx)
            info = (build_history if shape == "history" else build_distinct)(cat, a.entries)
            idx.close()
        else:
            info = {}
        info["index_bytes"] = sum(f.stat().st_size for f in Path(d).iterdir())
        info["index_mib_used"] = round(int(os.popen(f"du -sk {d}").read().split()[0]) / 1024, 1)
        print(f"  built: {info}", flush=True)
        info["queries"] = run_queries(d)
        results[shape] = info
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    out = HERE / "out" / f"catalog-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
