"""Deterministic benchmark dataset: the same bytes, names and times on every run.

    python bench/dataset.py generate ROOT [--seed S] [--scale F]
    python bench/dataset.py mutate ROOT            # the ~5% change between first and second backup
    python bench/dataset.py digest DIR             # content digest of a tree (verifies restores)

ROOT/data holds (scale 1.0, about 2 GB of file data plus a 1 GiB sparse disk image):

- ``small/``: ~24,000 text-like files (lognormal sizes, median ~4 KiB) in a two-level tree, 10% of them
  incompressible, plus symlinks;
- ``medium/``: ~200 files of 256 KiB-16 MiB (log-uniform), half random, half compressible;
- ``large/``: random, text and mixed-binary files of 128-256 MiB;
- ``dup/``: copies of a part of ``small/``, of 20 medium files and of one large file, and hard links;
- ``images/disk.img``: a 1 GiB sparse file holding a real ext4 filesystem (``mkfs.ext4 -d``) populated with
  ~350 MiB of its own files.

Random bytes come from keyed BLAKE3 in XOF mode (seekable, ~1 GB/s); text comes from a seeded phrase
table indexed by XOF bytes (compresses to ~30-40% with zstd -3, like prose and logs; no two files share
a chunk by accident). Every file and directory gets a fixed mtime/atime, mke2fs gets a fixed UUID, hash
seed and E2FSPROGS_FAKE_TIME, so ``digest`` gives the same value on every run.

``mutate`` edits ~5% of the data deterministically: overwrites and inserts inside large files, appends to
and deletes small files, replaces/adds/deletes medium files, and changes files inside the ext4 image
(debugfs for deletes and new files, in-place block overwrites for a "database" file). It records what it
changed in ROOT/mutation.json and refuses to run twice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import blake3

T0 = 1_704_067_200  # 2024-01-01T00:00:00Z: every generated file and directory
T1 = T0 + 86_400  # mutated and new files
BLOCK = 8 * 1024 * 1024  # generation block for large files
IMG_UUID = "6c6f6e67-6261-636b-7570-62656e636830"
IMG_HASH_SEED = "8a3e52a1-5c2d-4d6e-9f10-2b7c3a4d5e6f"
DEFAULT_SEED = "ihb-bench-1"


# --- byte generators -----------------------------------------------------------------------------------
class Gen:
    """All content derives from (seed, name): random bytes, text, mixed binary."""

    def __init__(self, seed: str) -> None:
        self.seed = seed
        self._key = blake3.blake3(seed.encode(), derive_key_context="ihb bench dataset v1").digest()  # type: ignore[call-arg]
        self._phrases = self._phrase_table()

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}/{name}")

    def rand(self, name: str, n: int, seek: int = 0) -> bytes:
        return blake3.blake3(name.encode(), key=self._key).digest(n, seek=seek)

    def _phrase_table(self) -> list[bytes]:
        rng = self.rng("vocabulary")
        letters = "etaoinshrdlcumwfgypbvkjxqz"
        weights = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9,
                   1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
        vocab: list[str] = []
        seen: set[str] = set()
        while len(vocab) < 6000:
            w = "".join(rng.choices(letters, weights, k=max(1, min(14, int(rng.gauss(5.5, 2.5))))))
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        cum = list(_accumulate([1.0 / (r + 1) ** 1.05 for r in range(len(vocab))]))
        ends = [" ", " ", ", ", ". ", ".\n", "\n", ": ", " = ", "; "]
        table: list[bytes] = []
        for i in range(65536):
            words = rng.choices(vocab, cum_weights=cum, k=rng.randint(3, 12))
            if i % 7 == 0:
                words[0] = words[0].capitalize()
            if i % 11 == 0:
                words.append(str(rng.randint(0, 99999)))
            table.append((" ".join(words) + rng.choice(ends)).encode())
        return table

    def text(self, name: str, n: int) -> bytes:
        """n bytes of prose/log-like text; each block of the result has its own phrase sequence."""
        out: list[bytes] = []
        have = 0
        part = 0
        get = self._phrases.__getitem__
        while have < n:
            want = min(n - have, BLOCK)
            idx = array("H")
            idx.frombytes(self.rand(f"{name}#t{part}", 2 * (want // 40 + 64)))
            s = b"".join(map(get, idx))
            while len(s) < want:  # rare: the phrases were short
                part += 1
                idx = array("H")
                idx.frombytes(self.rand(f"{name}#t{part}", 2 * (want // 40 + 64)))
                s += b"".join(map(get, idx))
            out.append(s[:want])
            have += want
            part += 1
        return b"".join(out)

    def mixed(self, name: str, n: int) -> bytes:
        """Database-like binary: per 64 KiB, 16 KiB random, 16 KiB zeros, 32 KiB text (~45% after zstd)."""
        out = bytearray()
        seg = 0
        while len(out) < n:
            out += self.rand(f"{name}#m{seg}", 16384)
            out += bytes(16384)
            out += self.text(f"{name}#m{seg}", 32768)
            seg += 1
        return bytes(out[:n])

    def content(self, kind: str, name: str, n: int) -> bytes:
        if kind == "random":
            return self.rand(name, n)
        if kind == "text":
            return self.text(name, n)
        if kind == "mixed":
            return self.mixed(name, n)
        raise ValueError(kind)

    def blocks(self, kind: str, name: str, n: int) -> Iterator[bytes]:
        """Content of a large file in BLOCK pieces (block i is content(kind, name#i))."""
        i = 0
        while i * BLOCK < n:
            ln = min(BLOCK, n - i * BLOCK)
            yield self.rand(name, ln, seek=i * BLOCK) if kind == "random" else self.content(kind, f"{name}#{i}", ln)
            i += 1


def _accumulate(xs: list[float]) -> Iterator[float]:
    t = 0.0
    for x in xs:
        t += x
        yield t


# --- file helpers --------------------------------------------------------------------------------------
def write_file(path: Path, data: bytes | Iterator[bytes], mtime: int = T0) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "wb") as f:
        if isinstance(data, bytes):
            f.write(data)
            n = len(data)
        else:
            for b in data:
                f.write(b)
                n += len(b)
    os.utime(path, (mtime, mtime))
    return n


def fix_dir_times(top: Path, t: int = T0) -> None:
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        os.utime(dirpath, (t, t))


def lognormal_size(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def loguniform_size(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def run(cmd: list[str], **kw: object) -> str:
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(T0))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return str(r.stdout)


# --- generation ----------------------------------------------------------------------------------------
def plan_small(gen: Gen, scale: float) -> list[tuple[str, str, int]]:
    rng = gen.rng("small")
    out = []
    for i in range(int(24000 * scale)):
        kind = "random" if rng.random() < 0.10 else "text"
        ext = ".bin" if kind == "random" else rng.choice([".txt", ".log", ".c", ".py", ".md", ".conf"])
        rel = f"small/d{i % 12:02d}/s{(i // 12) % 40:02d}/f{i:05d}{ext}"
        out.append((rel, kind, lognormal_size(rng, 4096, 1.3, 64, 512 * 1024)))
    return out


def plan_medium(gen: Gen, scale: float) -> list[tuple[str, str, int]]:
    rng = gen.rng("medium")
    out = []
    for i in range(max(4, int(200 * scale))):
        kind = ("random", "text", "mixed", "random")[i % 4]
        out.append((f"medium/m{i:03d}.{kind}", kind, loguniform_size(rng, 256 * 1024, 16 * 1024 * 1024)))
    return out


def plan_large(scale: float) -> list[tuple[str, str, int]]:
    mib = 1024 * 1024
    sizes = [("large/random-a.bin", "random", 256), ("large/text.log", "text", 192),
             ("large/mixed.db", "mixed", 256), ("large/random-b.bin", "random", 128)]
    return [(rel, kind, max(mib, int(n * mib * scale))) for rel, kind, n in sizes]


def generate(root: Path, seed: str, scale: float) -> dict[str, object]:
    t0 = time.monotonic()
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty")
    gen = Gen(seed)
    data = root / "data"
    total = 0
    small = plan_small(gen, scale)
    medium = plan_medium(gen, scale)
    large = plan_large(scale)
    for rel, kind, n in small + medium:
        total += write_file(data / rel, gen.content(kind, rel, n))
    for rel, kind, n in large:
        total += write_file(data / rel, gen.blocks(kind, rel, n))
    # Symlinks among the small files.
    rng = gen.rng("links")
    for i in range(max(1, int(200 * scale))):
        target = small[rng.randrange(len(small))][0]
        link = data / f"small/d{i % 12:02d}/link{i:03d}"
        os.symlink(os.path.relpath(data / target, link.parent), link)
        os.utime(link, (T0, T0), follow_symlinks=False)
    # Duplicates: two small-file directories, 20 medium files, one large file, a few hard links.
    dup = data / "dup"
    for d in ("d00", "d01"):
        shutil.copytree(data / "small" / d, dup / "small" / d, symlinks=True)
    (dup / "medium").mkdir(parents=True)
    for rel, _kind, _n in medium[:: max(1, len(medium) // 20)][:20]:
        shutil.copy2(data / rel, dup / "medium" / Path(rel).name)
    shutil.copy2(data / large[3][0], dup / "random-b.copy")
    for i, (rel, _k, _n) in enumerate(small[5:25]):
        os.link(data / rel, dup / f"hardlink{i:02d}")
    for dirpath, _dirs, files in os.walk(dup):
        for f in files:
            p = os.path.join(dirpath, f)
            os.utime(p, (T0, T0), follow_symlinks=False)
    img = build_image(root, gen, scale)
    fix_dir_times(data)
    summary = {"seed": seed, "scale": scale, "file_bytes": total, "tree_bytes": tree_bytes(data), "image": str(img),
               "image_size": os.path.getsize(img), "image_allocated": os.stat(img).st_blocks * 512,
               "seconds": round(time.monotonic() - t0, 1)}
    (root / "dataset.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def image_plan(gen: Gen, scale: float) -> list[tuple[str, str, int]]:
    rng = gen.rng("image")
    files = []
    for i in range(int(3000 * scale)):
        kind = "text" if i % 8 else "random"
        files.append((f"etc/c{i % 30:02d}/conf{i:04d}.{kind}", kind, lognormal_size(rng, 6000, 1.2, 100, 256 * 1024)))
    for i in range(max(2, int(40 * scale))):
        files.append((f"usr/lib/lib{i:03d}.so", "random", loguniform_size(rng, 512 * 1024, 8 * 1024 * 1024)))
    mib = 1024 * 1024
    files.append(("var/db/main.db", "mixed", max(mib, int(128 * mib * scale))))
    files.append(("var/cache/blob.bin", "random", max(mib, int(64 * mib * scale))))
    return files


def build_image(root: Path, gen: Gen, scale: float) -> Path:
    src = root / ".imgsrc"
    for rel, kind, n in image_plan(gen, scale):
        name = f"img/{rel}"
        write_file(src / rel, gen.blocks(kind, name, n) if n > BLOCK else gen.content(kind, name, n))
    fix_dir_times(src)
    img = root / "data" / "images" / "disk.img"
    img.parent.mkdir(parents=True, exist_ok=True)
    size = 1024 * 1024 * 1024 if scale >= 1 else max(64 * 1024 * 1024, int(1024 * 1024 * 1024 * scale))
    with open(img, "wb") as f:
        f.truncate(size)
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "benchdisk", "-U", IMG_UUID,
         "-E", f"hash_seed={IMG_HASH_SEED},root_owner=0:0", "-d", str(src), str(img)])
    # mke2fs -d copies each source inode's ctime, which nobody can set: pin them in the image.
    paths = ["/", "/lost+found"] + ["/" + str(p.relative_to(src)) for p in sorted(src.rglob("*"))]
    set_image_ctimes(img, paths, T0)
    shutil.rmtree(src)
    os.utime(img, (T0, T0))
    return img


def set_image_ctimes(img: Path, paths: list[str], t: int) -> None:
    with tempfile.NamedTemporaryFile("w", dir=img.parent, suffix=".debugfs") as f:
        f.write("".join(f"sif {p} ctime @{t}\n" for p in paths))
        f.flush()
        run(["debugfs", "-w", "-f", f.name, str(img)])


# --- mutation ------------------------------------------------------------------------------------------
def mutate(root: Path, seed: str | None = None) -> dict[str, object]:
    marker = root / "mutation.json"
    if marker.exists():
        raise SystemExit(f"{root} is already mutated ({marker})")
    info = json.loads((root / "dataset.json").read_text())
    seed = seed or info["seed"]
    scale = float(info["scale"])
    gen = Gen(seed)
    rng = gen.rng("mutate")
    data = root / "data"
    changed: dict[str, int] = {}

    def note(what: str, n: int) -> None:
        changed[what] = changed.get(what, 0) + n

    # Large files: in-place overwrites (random, mixed), inserts and an append (text: shifts CDC boundaries).
    for rel, kind, n in plan_large(scale):
        p = data / rel
        if kind == "random":
            with open(p, "r+b") as f:
                for j in range(16):
                    ln = 1024 * 1024 if n > 32 * 1024 * 1024 else 4096
                    off = rng.randrange(0, n - ln) & ~4095
                    f.seek(off)
                    f.write(gen.rand(f"mut/{rel}/{j}", ln))
                    note("large overwritten", ln)
        elif kind == "mixed":
            with open(p, "r+b") as f:
                for j in range(32):
                    ln = 256 * 1024 if n > 32 * 1024 * 1024 else 4096
                    off = rng.randrange(0, n - ln) & ~4095
                    f.seek(off)
                    f.write(gen.mixed(f"mut/{rel}/{j}", ln))
                    note("large overwritten", ln)
        else:
            old = p.read_bytes()
            offs = sorted(rng.randrange(0, len(old)) for _ in range(8))
            parts, prev = [], 0
            for j, off in enumerate(offs):
                ins = gen.text(f"mut/{rel}/ins{j}", 10_000)
                parts += [old[prev:off], ins]
                prev = off
                note("large inserted", len(ins))
            app = gen.text(f"mut/{rel}/append", max(4096, int(8 * 1024 * 1024 * scale)))
            parts += [old[prev:], app]
            note("large appended", len(app))
            with open(p, "wb") as f:
                for b in parts:
                    f.write(b)
        os.utime(p, (T1, T1))

    # Medium files: edit 10, delete 5, add 10.
    medium = plan_medium(gen, scale)
    picks = rng.sample(range(len(medium)), min(len(medium), 15))
    for i in picks[:10]:
        rel, kind, n = medium[i]
        p = data / rel
        ln = min(n, 65536)
        with open(p, "r+b") as f:
            f.seek((n - ln) // 2)
            f.write(gen.content(kind, f"mut/{rel}", ln))
        os.utime(p, (T1, T1))
        note("medium overwritten", ln)
    for i in picks[10:]:
        rel, _kind, n = medium[i]
        (data / rel).unlink()
        note("medium deleted", n)
    for i in range(max(2, int(10 * scale))):
        kind = ("random", "text", "mixed")[i % 3]
        rel = f"medium/new{i:02d}.{kind}"
        note("medium new", write_file(data / rel, gen.content(kind, f"mut/{rel}", loguniform_size(rng, 1 << 20, 8 << 20)), T1))

    # Small files: append to 2%, delete 1%, add 1000 in a new directory.
    small = plan_small(gen, scale)
    idx = rng.sample(range(len(small)), int(len(small) * 0.03))
    for i in idx[: len(idx) * 2 // 3]:
        rel, kind, _n = small[i]
        p = data / rel
        add = gen.content(kind, f"mut/{rel}", rng.randint(100, 4000))
        with open(p, "ab") as f:
            f.write(add)
        os.utime(p, (T1, T1))
        note("small appended", len(add))
    for i in idx[len(idx) * 2 // 3 :]:
        rel, _kind, n = small[i]
        p = data / rel
        if p.exists() and p.stat().st_nlink == 1:  # keep the hard-linked ones (dup/) intact
            p.unlink()
            note("small deleted", n)
    for i in range(int(1000 * scale)):
        rel = f"small/new/f{i:04d}.txt"
        note("small new", write_file(data / rel, gen.text(f"mut/{rel}", lognormal_size(rng, 4096, 1.3, 64, 256 * 1024)), T1))

    note("image changed", mutate_image(data / "images" / "disk.img", gen, rng, scale))
    for d in ("small", "medium", "large", "small/new"):
        os.utime(data / d, (T1, T1))
    total = sum(v for k, v in changed.items() if "deleted" not in k)
    summary = {"changed": changed, "changed_bytes": total, "dataset_bytes": int(info["tree_bytes"])}
    summary["changed_fraction"] = round(total / summary["dataset_bytes"], 4)
    marker.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def mutate_image(img: Path, gen: Gen, rng: random.Random, scale: float) -> int:
    """Deletes and new files through debugfs; in-place overwrites of the database file's blocks."""
    changed = 0
    plan = image_plan(gen, scale)
    with tempfile.TemporaryDirectory(dir=img.parent) as tmp:
        cmds = []
        for rel, _k, _n in rng.sample(plan[: int(3000 * scale)], 20):
            cmds.append(f"rm /{rel}")
        cmds.append("mkdir /var/new")
        for i in range(4):
            n = max(64 * 1024, int(5 * 1024 * 1024 * scale))
            f = Path(tmp) / f"new{i}"
            f.write_bytes(gen.content("random" if i % 2 else "text", f"mut/img/new{i}", n))
            cmds.append(f"write {f} /var/new/new{i}.dat")
            changed += n
        cf = Path(tmp) / "cmds"
        cf.write_text("\n".join(cmds) + "\n")
        run(["debugfs", "-w", "-f", str(cf), str(img)])
    out = run(["debugfs", "-R", "blocks /var/db/main.db", str(img)])
    blocks = [int(b) for b in out.split()]
    with open(img, "r+b") as f:
        for j in range(16):
            run_len = min(128, len(blocks))  # 512 KiB runs of file blocks
            start = rng.randrange(0, len(blocks) - run_len + 1)
            data = gen.mixed(f"mut/img/db{j}", run_len * 4096)
            for k in range(run_len):
                f.seek(blocks[start + k] * 4096)
                f.write(data[k * 4096 : (k + 1) * 4096])
            changed += run_len * 4096
    os.utime(img, (T1, T1))
    return changed


def tree_bytes(top: Path) -> int:
    """Bytes of data in a tree: each inode once, sparse files by their allocated size."""
    seen: set[int] = set()
    n = 0
    for dirpath, _dirs, files in os.walk(top):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                n += min(st.st_size, st.st_blocks * 512) if st.st_blocks * 512 < st.st_size else st.st_size
    return n


# --- digest --------------------------------------------------------------------------------------------
def digest(top: Path) -> str:
    """BLAKE3 over every entry's relative name, type, size, symlink target and content (not times)."""
    h = blake3.blake3()
    for dirpath, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, top)
            st = os.lstat(p)
            h.update(rel.encode() + b"\0")
            if stat.S_ISLNK(st.st_mode):
                h.update(b"L" + os.readlink(p).encode() + b"\0")
            elif stat.S_ISREG(st.st_mode):
                h.update(b"F%d\0" % st.st_size)
                if st.st_size:
                    fh = blake3.blake3(max_threads=blake3.blake3.AUTO)
                    fh.update_mmap(p)
                    h.update(fh.digest())
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(dirpath, d))]
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="create the dataset in an empty or new ROOT")
    g.add_argument("root", type=Path)
    g.add_argument("--seed", default=DEFAULT_SEED)
    g.add_argument("--scale", type=float, default=1.0, help="fraction of the full size (for quick runs)")
    m = sub.add_parser("mutate", help="change ~5%% of ROOT's data (once)")
    m.add_argument("root", type=Path)
    d = sub.add_parser("digest", help="content digest of a directory tree")
    d.add_argument("dir", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "generate":
        print(json.dumps(generate(a.root, a.seed, a.scale), indent=1))
    elif a.cmd == "mutate":
        print(json.dumps(mutate(a.root), indent=1))
    else:
        print(digest(a.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
