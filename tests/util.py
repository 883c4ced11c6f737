"""Helpers shared by the test tiers: run the real CLI in a subprocess, compare trees field by field."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path


def ihb(*args: str, env: dict[str, str] | None = None, check: bool = True, input: bytes | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    """Run `ihb ARGS` as a separate process, the way a user does."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    p = subprocess.run([sys.executable, "-m", "appliance.cli", *args], env=full_env, input=input,
                       capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"ihb {' '.join(args)} exited {p.returncode}\nstdout: {p.stdout.decode()}\n"
                             f"stderr: {p.stderr.decode()}")
    return p


def _xattrs(p: str) -> dict[str, bytes]:
    try:
        return {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)}
    except OSError:
        return {}


def snapshot_tree(root: Path, with_atime: bool = False) -> dict[str, dict[str, object]]:
    """Every entry under root with the metadata a restore must reproduce."""
    out: dict[str, dict[str, object]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            rec: dict[str, object] = {
                "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "xattrs": _xattrs(p),
            }
            if not stat.S_ISDIR(st.st_mode):
                rec["mtime_ns"] = st.st_mtime_ns
                rec["nlink"] = st.st_nlink
            else:
                rec["mtime_ns"] = st.st_mtime_ns
            if with_atime:
                rec["atime_ns"] = st.st_atime_ns
            if stat.S_ISREG(st.st_mode):
                rec["size"] = st.st_size
                with open(p, "rb") as f:
                    rec["data"] = f.read()
                rec["allocated_le"] = st.st_blocks  # restored sparse files must not be denser (checked loosely)
                if st.st_nlink > 1:
                    rec["hardlink_group"] = inodes.setdefault(st.st_ino, rel)
            elif stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rec["rdev"] = st.st_rdev
            out[rel] = rec
    return out


def assert_same_tree(src: Path, dst: Path) -> None:
    a, b = snapshot_tree(src), snapshot_tree(dst)
    assert sorted(a) == sorted(b), f"entries differ: only in source {sorted(set(a) - set(b))[:5]}, only in restore {sorted(set(b) - set(a))[:5]}"
    for rel in a:
        ra, rb = dict(a[rel]), dict(b[rel])
        alloc_a, alloc_b = ra.pop("allocated_le", 0), rb.pop("allocated_le", 0)
        assert isinstance(alloc_a, int) and isinstance(alloc_b, int)
        # holes restored as holes: never much denser than the source (fs rounding aside)
        assert alloc_b <= alloc_a + 64, f"{rel}: restored file is not sparse ({alloc_b} vs {alloc_a} blocks)"
        for k in ra:
            assert ra[k] == rb.get(k), f"{rel}: {k} differs: {str(ra[k])[:80]} != {str(rb.get(k))[:80]}"
