"""The file catalog on real backups: find by name glob and path, versions only where a file changed,
catalogued at the end of every backup, forgotten by prune, rebuilt from the restore points, fed from a
guest file system walk."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from repo import catalog as cat
from repo.backup import BackupOptions, backup_paths
from repo.catalog import Catalog, glob_regex, walk_guestfs
from repo.prune import plan_prune
from repo.repository import Repository
from repo.retention import Policy
from repo.snapshot import DiskRecord, Snapshot
from tests.util import ihb


def _write(p: Path, data: bytes, mtime: int | None = None) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    if mtime is not None:
        os.utime(p, ns=(mtime, mtime))


@pytest.fixture
def history(tmp_path: Path, repo: Repository) -> tuple[Repository, Path, list[Snapshot]]:
    """Three restore points of web1 and one of db1; nginx.conf changes once, Notes.TXT vanishes."""
    src = tmp_path / "src"
    t = 1_700_000_000_000_000_000
    _write(src / "etc/nginx/nginx.conf", b"worker_processes 1;\n", t)
    _write(src / "etc/nginx/sites/default.conf", b"server {}\n", t)
    _write(src / "etc/hosts", b"127.0.0.1 localhost\n", t)
    _write(src / "home/ann/Notes.TXT", b"todo\n", t)
    snaps = [backup_paths(repo, [str(src)], BackupOptions(host="web1"))]
    _write(src / "etc/nginx/nginx.conf", b"worker_processes 4;\n", t + 10**9)
    snaps.append(backup_paths(repo, [str(src)], BackupOptions(host="web1")))
    (src / "home/ann/Notes.TXT").unlink()
    snaps.append(backup_paths(repo, [str(src)], BackupOptions(host="web1")))
    snaps.append(backup_paths(repo, [str(src / "etc")], BackupOptions(host="db1", meta={"tenant": "beta"})))
    return repo, src, snaps


def test_find_and_versions_on_real_backups(history: tuple[Repository, Path, list[Snapshot]]) -> None:
    repo, src, snaps = history
    base = str(src)
    # catalogued by the backups themselves
    assert Catalog(repo.index).snapshot_ids() == {s.id for s in snaps}
    r = cat.find(repo, "nginx.conf")
    states = sorted((v.host, v.size, len(v.snapshots)) for v in r.hits)
    assert states == [("db1", 20, 1), ("web1", 20, 1), ("web1", 20, 2)]
    assert r.uncatalogued == 0
    # versions: one line per change, oldest first
    vs = cat.versions(repo, "web1", f"{base}/etc/nginx/nginx.conf")
    assert [(v.size, [s for s, _ in v.snapshots]) for v in vs] == [(20, [snaps[0].id]), (20, [snaps[1].id, snaps[2].id])]
    assert vs[0].digest != vs[1].digest and vs[0].mtime_ns < vs[1].mtime_ns
    unchanged = cat.versions(repo, "web1", f"{base}/etc/hosts")
    assert len(unchanged) == 1 and len(unchanged[0].snapshots) == 3
    # globs: suffix, prefix, infix, case
    assert {v.path.rsplit("/", 1)[1] for v in cat.find(repo, "*.conf").hits} == {"nginx.conf", "default.conf"}
    assert {v.path for v in cat.find(repo, "ngin*", host="web1").hits} == {f"{base}/etc/nginx", f"{base}/etc/nginx/nginx.conf"}
    assert {v.path for v in cat.find(repo, "*ginx*", host="db1").hits} == {f"{base}/etc/nginx", f"{base}/etc/nginx/nginx.conf"}
    assert cat.find(repo, "notes.txt").hits == []
    notes = cat.find(repo, "notes.txt", ignore_case=True).hits
    assert [(v.host, [s for s, _ in v.snapshots]) for v in notes] == [("web1", [snaps[0].id, snaps[1].id])]
    # path prefix and path glob
    sub = {(v.host, v.path) for v in cat.find(repo, f"{base}/etc/nginx/").hits}
    assert sub == {(h, f"{base}/etc/nginx{p}") for h in ("web1", "db1") for p in ("", "/nginx.conf", "/sites",
                                                                                    "/sites/default.conf")}
    assert {v.path for v in cat.find(repo, f"{base}/*/nginx/*.conf").hits} == {f"{base}/etc/nginx/nginx.conf"}
    assert {v.path for v in cat.find(repo, f"{base}/**.conf", host="web1").hits} == {
        f"{base}/etc/nginx/nginx.conf", f"{base}/etc/nginx/sites/default.conf"}
    # --since and --tenant
    since = snaps[2].time_ns
    assert {(v.host, len(v.snapshots)) for v in cat.find(repo, "nginx.conf", since_ns=since).hits} == {("web1", 1), ("db1", 1)}
    assert {v.host for v in cat.find(repo, "nginx.conf", tenant="beta").hits} == {"db1"}
    assert len(cat.find(repo, "*", limit=3).hits) == 3 and cat.find(repo, "*", limit=3).truncated


def test_prune_forgets_and_rebuild_restores(history: tuple[Repository, Path, list[Snapshot]]) -> None:
    repo, src, snaps = history
    plan = plan_prune(repo, Policy(last=1), host="web1")
    assert {s.id for s in plan.remove} == {snaps[0].id, snaps[1].id}
    plan.execute()
    vs = cat.versions(repo, "web1", f"{src}/etc/nginx/nginx.conf")
    assert [[s for s, _ in v.snapshots] for v in vs] == [[snaps[2].id]]
    assert cat.find(repo, "notes.txt", ignore_case=True).hits == []
    before = sorted((v.host, v.path, v.size, tuple(v.snapshots)) for v in cat.find(repo, "*", limit=10**6).hits)
    # `check --repair` clears the catalog db; the catalog notices and a rebuild restores the same answers
    repo.index.clear(["catalog"])
    assert cat.uncatalogued(repo) == 2
    assert cat.rebuild(repo)["indexed"] == 2
    after = sorted((v.host, v.path, v.size, tuple(v.snapshots)) for v in cat.find(repo, "*", limit=10**6).hits)
    assert after == before


def test_out_of_order_restore_point_reindexes_its_lineage(tmp_path: Path, repo: Repository) -> None:
    src = tmp_path / "s"
    _write(src / "a", b"1")
    s1 = backup_paths(repo, [str(src)], BackupOptions(host="h"))
    _write(src / "a", b"22")
    s2 = backup_paths(repo, [str(src)], BackupOptions(host="h"))
    c = Catalog(repo.index)
    c.clear()
    cat.index_snapshot(repo, s2)
    cat.index_snapshot(repo, s1)  # older than the lineage head: the lineage is re-indexed in time order
    vs = cat.versions(repo, "h", f"{src}/a")
    assert [(v.size, [s for s, _ in v.snapshots]) for v in vs] == [(1, [s1.id]), (2, [s2.id])]


@dataclass
class _St:
    type: object
    size: int
    mtime_ns: int


@dataclass
class _T:
    value: int


class FakeGuestFS:
    """The two calls walk_guestfs uses, over a dict tree (the real one is repo.guestfs.GuestFS)."""

    def __init__(self, tree: dict[str, object]) -> None:
        self.tree = tree

    def scandir(self, path: str):  # type: ignore[no-untyped-def]
        node: object = self.tree
        for c in [c for c in path.split("/") if c]:
            node = node[c]  # type: ignore[index]
        for name, v in node.items():  # type: ignore[attr-defined]
            if isinstance(v, dict):
                yield name, _St(_T(0o040000), 0, 5)
            else:
                yield name, _St(_T(0o100000), len(v), 7)


def test_guest_files_are_found_beside_agent_files(history: tuple[Repository, Path, list[Snapshot]]) -> None:
    repo, _src, _snaps = history
    image = Snapshot(id="ab" * 32, kind="image", host="appliance", time_ns=time.time_ns(),
                     disks=[DiskRecord("vda", 1 << 20, 262144, [])], meta={"vm": "vm7"})
    fs = FakeGuestFS({"etc": {"nginx": {"nginx.conf": b"guest conf\n"}, "fstab": b"x"}})
    n = Catalog(repo.index).add(image, walk_guestfs(fs), source="image:vda:p1")
    assert n == 4
    hits = {(v.host, v.path) for v in cat.find(repo, "nginx.conf").hits}
    assert ("vm7", "/etc/nginx/nginx.conf") in hits and ("web1", f"{_src}/etc/nginx/nginx.conf") in hits
    assert [v.size for v in cat.versions(repo, "vm7", "/etc/nginx/nginx.conf")] == [11]


def test_glob_translation() -> None:
    assert glob_regex("*.conf").match("nginx.conf") and not glob_regex("*.conf").match("a/b.conf")
    assert glob_regex("/etc/**.conf").match("/etc/a/b/c.conf")
    assert glob_regex("[!a]?c").match("xbc") and not glob_regex("[!a]?c").match("abc")
    assert glob_regex("NGINX*", ignore_case=True).match("nginx.conf")
    assert cat._literal_segments("*ab?cd[xy]e") == ["ab", "cd", "e"]


def test_cli_find_and_versions(tmp_path: Path, cli_env: dict[str, str]) -> None:
    src = tmp_path / "src"
    _write(src / "etc/app.ini", b"a=1\n")
    ihb("backup", str(src), "--host", "web9", env=cli_env)
    _write(src / "etc/app.ini", b"a=22\n")
    ihb("backup", str(src), "--host", "web9", env=cli_env)
    found = json.loads(ihb("find", "app.ini", "--json", env=cli_env).stdout)
    assert [m["size"] for m in found["matches"]] == [4, 5] and found["uncatalogued"] == 0
    out = ihb("versions", f"web9:{src}/etc/app.ini", env=cli_env).stdout.decode()
    assert len(out.strip().splitlines()) == 2, out
