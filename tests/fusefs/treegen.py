"""Deterministic test data for the FUSE tests: source trees with every kind of entry, images built
through repo.image directly, a 100,000-entry directory, and field-by-field comparison helpers."""

from __future__ import annotations

import bisect
import os
import random
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repo.image import ImageWriter
from repo.repository import Repository
from repo.snapshot import Snapshot
from repo.tree import TYPE_DIR, TYPE_FILE, DirBuilder, pack_node
from repo.workers import Pipeline

NON_UTF8 = b"caf\xe9-\xff.bin"
MiB = 1024 * 1024


def _bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def make_tree(root: Path, seed: int = 7) -> dict[str, Any]:
    """Regular, empty, compressible, multi-chunk, sparse and hard-linked files, symlinks (relative,
    absolute, dangling), xattrs, fifos, a device node, empty and deep directories, odd modes, owners
    and a non-UTF-8 name. Times are set last, atimes in the future so reading never moves them."""
    rng = random.Random(seed)
    r = os.fsencode(root)
    os.makedirs(r, exist_ok=True)
    files: dict[bytes, bytes] = {
        b"empty": b"",
        b"one": b"x",
        b"page": _bytes(rng, 4096),
        b"page+1": _bytes(rng, 4097),
        b"text.txt": b"".join(b"line %d of a compressible file\n" % i for i in range(40000)),
        b"random-3m": _bytes(rng, 3 * MiB + 123),
        b"sub/inner.bin": _bytes(rng, 70000),
        b"sub/deeper/a/b/c/leaf": b"leaf\n",
        NON_UTF8: _bytes(rng, 1000),
        b"dir with spaces/file name with spaces": b"spaces\n",
    }
    for rel, data in files.items():
        p = os.path.join(r, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    # Sparse: 40 MiB with three islands (the backup records the holes).
    sparse = os.path.join(r, b"sparse.img")
    with open(sparse, "wb") as f:
        f.truncate(40 * MiB)
        for off in (0, 17 * MiB + 5, 40 * MiB - 4096):
            f.seek(off)
            f.write(_bytes(rng, 4096))
    # Hard links across directories.
    os.makedirs(os.path.join(r, b"links"), exist_ok=True)
    os.link(os.path.join(r, b"random-3m"), os.path.join(r, b"links/hard-1"))
    os.link(os.path.join(r, b"random-3m"), os.path.join(r, b"sub/hard-2"))
    os.link(os.path.join(r, b"one"), os.path.join(r, b"links/one-again"))
    # Symlinks.
    os.symlink(b"../text.txt", os.path.join(r, b"links/rel"))
    os.symlink(b"/etc/hostname", os.path.join(r, b"links/abs"))
    os.symlink(b"does/not/exist", os.path.join(r, b"links/dangling"))
    os.symlink(NON_UTF8, os.path.join(r, b"links/to-non-utf8"))
    # Special files and empty directories.
    os.mkfifo(os.path.join(r, b"fifo"))
    try:
        os.mknod(os.path.join(r, b"null-dev"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError:
        pass  # not permitted here: the tree simply has no device node
    for d in (b"empty-dir", b"sub/empty-too", b"sticky"):
        os.makedirs(os.path.join(r, d), exist_ok=True)
    # Modes and owners.
    os.chmod(os.path.join(r, b"sticky"), 0o1777)
    os.chmod(os.path.join(r, b"one"), 0o4755)
    os.chmod(os.path.join(r, b"page"), 0o600)
    os.chmod(os.path.join(r, b"page+1"), 0o000)
    if os.geteuid() == 0:
        os.chown(os.path.join(r, b"page"), 1234, 5678)
        os.chown(os.path.join(r, b"links/rel"), 4321, 8765, follow_symlinks=False)
    # Extended attributes (user.* on files and directories).
    xattrs = {
        b"text.txt": {"user.comment": b"hello", "user.binary": bytes(range(256))},
        b"sub": {"user.dir": b"d"},
        b"random-3m": {"user.big": _bytes(rng, 2000)},
        b"empty": {"user.empty": b""},
    }
    for rel, xs in xattrs.items():
        for k, v in xs.items():
            os.setxattr(os.path.join(r, rel), k, v)
    # Times, deepest first so directory mtimes stay put.
    base = 1_600_000_000_000_000_000
    future = time.time_ns() + 3600 * 10**9
    entries = []
    for dirpath, dirnames, filenames in os.walk(r):
        for n in dirnames + filenames:
            entries.append(os.path.join(dirpath, n))
    entries.sort(key=lambda p: -p.count(b"/"))
    for i, p in enumerate(entries):
        os.utime(p, ns=(future + i * 1_000_001, base + i * 1_234_567_891), follow_symlinks=False)
    return {"files": files}


def _xattrs(p: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(p, n, follow_symlinks=False) for n in sorted(names)}


def describe(root: Path | bytes) -> dict[bytes, dict[str, Any]]:
    """Every entry below root: the stat fields the mount must reproduce, xattrs and link targets."""
    r = os.fsencode(root)
    out: dict[bytes, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(r):
        dirnames.sort()
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rec: dict[str, Any] = {
                "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink,
                "mtime_ns": st.st_mtime_ns, "atime_ns": st.st_atime_ns, "ctime_ns": st.st_ctime_ns,
                "xattrs": _xattrs(p), "ino": st.st_ino,
            }
            if not stat.S_ISDIR(st.st_mode):
                rec["size"] = st.st_size
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rec["rdev"] = st.st_rdev
            if stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(p)
            out[os.path.relpath(p, r)] = rec
    return out


def compare(expected: dict[bytes, dict[str, Any]], actual: dict[bytes, dict[str, Any]]) -> list[str]:
    """Differences, one line each; hard links are compared as 'same inode in the mount'."""
    problems = []
    if set(expected) != set(actual):
        problems.append(f"entries differ: missing {sorted(set(expected) - set(actual))[:5]}, "
                        f"extra {sorted(set(actual) - set(expected))[:5]}")
    groups: dict[int, set[int]] = {}
    for rel in sorted(set(expected) & set(actual)):
        e, a = expected[rel], actual[rel]
        for k, v in e.items():
            if k == "ino":
                continue
            if a.get(k) != v:
                problems.append(f"{rel!r}: {k} is {a.get(k)!r}, expected {v!r}")
        groups.setdefault(e["ino"], set()).add(a["ino"])
    for src_ino, mount_inos in groups.items():
        if len(mount_inos) != 1:
            problems.append(f"hard links of source inode {src_ino} have mount inodes {sorted(mount_inos)}")
    if len({next(iter(v)) for v in groups.values()}) != len(groups):
        problems.append("two different source inodes share one mount inode")
    return problems


# --- images -------------------------------------------------------------------------------------------
@dataclass
class ImageSpec:
    """A disk of ``size`` bytes of zeros with random islands; ``expected()`` rebuilds any range."""

    size: int
    islands: list[tuple[int, bytes]]

    def expected(self, off: int, n: int) -> bytes:
        end = min(off + n, self.size)
        if off >= end:
            return b""
        out = bytearray(end - off)
        starts = [o for o, _ in self.islands]
        i = max(0, bisect.bisect_right(starts, off) - 1)
        while i < len(self.islands) and self.islands[i][0] < end:
            o, data = self.islands[i]
            lo, hi = max(o, off), min(o + len(data), end)
            if lo < hi:
                out[lo - off : hi - off] = data[lo - o : hi - o]
            i += 1
        return bytes(out)


def make_image_spec(size: int, count: int, seed: int = 11) -> ImageSpec:
    rng = random.Random(seed)
    slots = sorted(rng.sample(range(size // (4 * MiB)), count))
    islands = []
    for s in slots:
        ln = rng.choice([4096, 65536 + 17, MiB, 2 * MiB + 12345])
        off = s * 4 * MiB + rng.randrange(0, 4 * MiB - ln)
        islands.append((off, _bytes(rng, ln)))
    islands.append((size - 5000, _bytes(rng, 5000)))  # the very end
    return ImageSpec(size, islands)


def store_image(repo: Repository, vm: str, disks: dict[str, ImageSpec], time_ns: int | None = None) -> Snapshot:
    writer = repo.writer()
    records = []
    with Pipeline() as pipe:
        for name, spec in disks.items():
            iw = ImageWriter(repo, writer, pipe, name, spec.size)
            pos = 0
            for off, data in spec.islands:
                if off > pos:
                    iw.zero(pos, off - pos)
                iw.write(off, data)
                pos = off + len(data)
            if pos < spec.size:
                iw.zero(pos, spec.size - pos)
            records.append(iw.finish())
        pipe.drain()
    writer.flush()
    return repo.store_snapshot(Snapshot(id="", kind="image", host="hv1", time_ns=time_ns or time.time_ns(),
                                        disks=records, meta={"vm": vm}))


# --- a huge directory -----------------------------------------------------------------------------------
def big_dir_name(i: int) -> bytes:
    return b"entry-%06d" % i


def store_big_dir(repo: Repository, count: int, host: str = "bighost") -> Snapshot:
    """A restore point whose ``big/`` holds ``count`` empty files, built straight from tree pages."""
    writer = repo.writer()
    t = 1_650_000_000_000_000_000
    big = DirBuilder(writer)
    for i in range(count):
        n = big_dir_name(i)
        big.add(n, {"n": n, "t": TYPE_FILE, "m": 0o100644, "u": 0, "g": 0, "s": 0, "mt": t + i, "at": t, "ct": t,
                    "nl": 1, "c": []}, approx_size=80)
    top = DirBuilder(writer)
    top.add(b"big", {"n": b"big", "t": TYPE_DIR, "m": 0o40755, "u": 0, "g": 0, "s": 0, "mt": t, "at": t, "ct": t,
                     "nl": 2, "d": big.finish()})
    root = {"n": b"", "t": TYPE_DIR, "m": 0o40755, "u": 0, "g": 0, "s": 0, "mt": t, "at": t, "ct": t, "nl": 3,
            "d": top.finish()}
    writer.flush()
    return repo.store_snapshot(Snapshot(id="", kind="files", host=host, time_ns=time.time_ns(), paths=["/big"],
                                        tree=pack_node(root)))
