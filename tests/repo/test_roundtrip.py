"""Back up generated trees and restore them: every byte and every metadata field must come back."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repo.backup import BackupOptions, backup_paths
from repo.repository import Repository
from repo.restore import RestoreOptions, restore_snapshot
from tests.util import assert_same_tree, ihb

names = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/\0", exclude_categories=("Cs",)),
                min_size=1, max_size=12).filter(lambda n: n not in (".", "..") and len(n.encode()) < 200)
contents = st.one_of(st.binary(max_size=3000), st.builds(lambda n, b: b * n, st.integers(1, 200_000), st.binary(min_size=1, max_size=8)))
entry = st.tuples(st.lists(names, min_size=1, max_size=3), st.sampled_from("ffffdls"), contents,
                  st.integers(0o400, 0o777), st.integers(0, 2**31), st.dictionaries(names, st.binary(max_size=40), max_size=2),
                  st.integers(0, 3))


def build_tree(root: Path, entries: list[tuple]) -> None:
    root.mkdir()
    for comps, kind, data, mode, mtime, xattrs, owner in entries:
        p = root
        for c in comps[:-1]:
            p = p / c
            if p.is_symlink() or (p.exists() and not p.is_dir()):
                break
            p.mkdir(exist_ok=True)
        else:
            p = p / comps[-1]
            if os.path.lexists(p):
                continue
            if kind == "f":
                p.write_bytes(data)
            elif kind == "d":
                p.mkdir()
            elif kind == "l":
                os.symlink(data.decode("latin-1").replace("\0", "")[:50] or "x", p)  # NUL never occurs in a path
            else:
                with open(p, "wb") as f:  # sparse: data, a hole, data
                    f.write(data[:100])
                    f.seek(3 * 1024 * 1024)
                    f.write(b"end")
            if kind != "l":
                for k, v in xattrs.items():
                    os.setxattr(p, "user." + k, v)
                os.chown(p, 1000 + owner, 2000 + owner)
                os.chmod(p, mode | (0o700 if kind == "d" else 0))
            os.utime(p, ns=(mtime * 1000 + 7, mtime * 1000 + 3), follow_symlinks=False)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(entries=st.lists(entry, max_size=25))
def test_generated_tree_roundtrip(tmp_path_factory, entries) -> None:
    base = tmp_path_factory.mktemp("rt")
    src = base / "src"
    build_tree(src, entries)
    Repository.init(str(base / "repo"), b"pw", pack_size=128 * 1024)
    with Repository.open(str(base / "repo"), lambda: b"pw") as repo:
        snap = backup_paths(repo, [str(src)], BackupOptions(host="h1"))
        assert not snap.errors
        out = base / "out"
        stats, errors = restore_snapshot(repo, snap, str(out), RestoreOptions())
        assert not errors
    assert_same_tree(src, out / str(src).lstrip("/"))


def test_special_files_acls_hardlinks_cli(tmp_path: Path, cli_env: dict[str, str]) -> None:
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "a.txt").write_text("alpha\n" * 1000)
    os.link(src / "d" / "a.txt", src / "d" / "e" / "a-link")
    os.link(src / "d" / "a.txt", src / "hl2")
    os.mkfifo(src / "fifo")
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.symlink("/etc/passwd", src / "abs-link")
    os.symlink("../d/a.txt", src / "d" / "e" / "rel-link")
    with open(src / "sparse", "wb") as f:
        f.seek(50 * 1024 * 1024)
        f.write(b"tail")
    (src / "big").write_bytes(os.urandom(3 * 1024 * 1024))
    (src / "bad\xff".encode() if False else src / "snow☃").write_bytes(b"unicode")
    os.mkdir(src / "empty")
    subprocess.run(["setfacl", "-m", "u:1234:rwx", str(src / "d" / "a.txt")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "g:99:rx", str(src / "d")], check=True)
    os.utime(src / "d", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    ihb("backup", "--host", "h", str(src), env=cli_env)
    out = tmp_path / "out"
    ihb("restore", "latest", str(out), env=cli_env)
    restored = out / str(src).lstrip("/")
    assert_same_tree(src, restored)
    acl = subprocess.run(["getfacl", "-c", str(restored / "d" / "a.txt")], capture_output=True, text=True, check=True).stdout
    assert "user:1234:rwx" in acl
    assert os.stat(restored / "sparse").st_blocks * 512 < 1024 * 1024  # 50 MiB hole stayed a hole
    st1, st2 = os.stat(restored / "d" / "a.txt"), os.stat(restored / "hl2")
    assert st1.st_ino == st2.st_ino and st1.st_nlink == 3
    # a non-UTF-8 file name survives too
    raw = os.fsencode(str(src)) + b"/raw\xffname"
    with open(raw, "wb") as f:
        f.write(b"bytes")
    ihb("backup", "--host", "h", str(src), env=cli_env)
    out2 = tmp_path / "out2"
    ihb("restore", "latest", str(out2), env=cli_env)
    with open(os.fsencode(str(out2)) + os.fsencode(str(src)) + b"/raw\xffname", "rb") as f:
        assert f.read() == b"bytes"


def test_include_and_cat_and_ls(tmp_path: Path, cli_env: dict[str, str]) -> None:
    src = tmp_path / "s"
    (src / "x" / "y").mkdir(parents=True)
    (src / "x" / "y" / "f").write_bytes(b"content-f")
    (src / "g").write_bytes(b"content-g")
    ihb("backup", str(src), env=cli_env)
    out = tmp_path / "o"
    ihb("restore", "latest", str(out), "--include", f"{src}/x/y/f", env=cli_env)
    assert (out / str(src).lstrip("/") / "x" / "y" / "f").read_bytes() == b"content-f"
    assert not (out / str(src).lstrip("/") / "g").exists()
    assert ihb("cat", "latest", f"{src}/g", env=cli_env).stdout == b"content-g"
    import json

    rows = json.loads(ihb("ls", "latest", str(src), "--json", env=cli_env).stdout)
    assert sorted(r["path"] for r in rows) == [f"{src}/g", f"{src}/x"]
