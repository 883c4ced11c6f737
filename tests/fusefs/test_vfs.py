"""The FUSE-free model (fusefs/vfs.py) on real repositories: layout, metadata, inode stability, paged
directories, image reads, readahead, refresh, non-blocking mode and the disk-children hook."""

from __future__ import annotations

import errno
import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusefs import vfs as vfsmod
from fusefs.vfs import (
    ROOT_INO,
    DamagedChunk,
    DiskContext,
    LinkNode,
    Vfs,
    WouldBlock,
    call_nowait,
    register_disk_children,
)
from repo import format as fmt
from repo.tree import TreeReader, root_node

from .conftest import BIG_DIR_ENTRIES, Data, make_env
from .treegen import MiB, big_dir_name, compare, describe, make_image_spec, store_big_dir, store_image


@pytest.fixture
def model(data: Data) -> Iterator[Vfs]:
    with data.env.open() as repo:
        v = Vfs(repo, cache_bytes=32 * MiB)
        try:
            yield v
        finally:
            v.close()


def resolve(v: Vfs, path: bytes) -> int:
    """Look up a path; ``latest`` links (same-directory targets) are followed."""
    ino = ROOT_INO
    for comp in [c for c in path.split(b"/") if c]:
        parent, a = ino, v.lookup(ino, comp)
        ino = a.ino
        if stat.S_ISLNK(a.mode) and comp == b"latest":
            ino = v.lookup(parent, v.readlink(ino)).ino
    return ino


def listdir(v: Vfs, ino: int) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    off = 0
    while True:
        batch = v.readdir(ino, off, 50)
        for nxt, name, attr, _node in batch:
            assert name not in out, f"{name!r} listed twice"
            out[name] = attr.ino
            off = nxt
        if len(batch) < 50:
            return out


def read_all(v: Vfs, ino: int, step: int = 300_000) -> bytes:
    fh = v.open(ino)
    try:
        size = v.getattr(ino).size
        return b"".join(bytes(v.read(fh, off, step)) for off in range(0, size, step))
    finally:
        v.release(fh)


def describe_model(v: Vfs, ino: int, prefix: bytes = b"") -> dict[bytes, dict[str, object]]:
    """describe() of a tree inside the model."""
    out: dict[bytes, dict[str, object]] = {}
    for name, child in sorted(listdir(v, ino).items()):
        a = v.lookup(ino, name)
        assert a.ino == child
        rel = prefix + name
        rec: dict[str, object] = {"mode": a.mode, "uid": a.uid, "gid": a.gid, "nlink": a.nlink, "mtime_ns": a.mtime_ns,
                                  "atime_ns": a.atime_ns, "ctime_ns": a.ctime_ns, "ino": a.ino,
                                  "xattrs": {k.decode(): v.getxattr(a.ino, k) for k in v.listxattr(a.ino)}}
        if not stat.S_ISDIR(a.mode):
            rec["size"] = a.size
        if stat.S_ISCHR(a.mode) or stat.S_ISBLK(a.mode):
            rec["rdev"] = a.rdev
        if stat.S_ISLNK(a.mode):
            rec["target"] = v.readlink(a.ino)
        out[rel] = rec
        if stat.S_ISDIR(a.mode):
            out.update(describe_model(v, a.ino, rel + b"/"))
    return out


def test_layout(model: Vfs, data: Data) -> None:
    assert set(listdir(model, ROOT_INO)) == {b"by-host", b"vms", b"by-id"}
    hosts = listdir(model, resolve(model, b"by-host"))
    assert {b"alpha", b"bighost"} <= set(hosts)
    label = data.files_snap.time_label().encode()
    points = listdir(model, resolve(model, b"by-host/alpha"))
    assert label in points and b"latest" in points
    newest = [s for s in model.repo.snapshots() if s.host == "alpha"][-1]  # mount tests may add some
    assert model.readlink(model.lookup(resolve(model, b"by-host/alpha"), b"latest").ino) == newest.time_label().encode()
    vm_dir = resolve(model, b"vms/vm1/" + data.image_snap.time_label().encode())
    assert {n for n in listdir(model, vm_dir) if n.endswith(b".raw")} == {b"disk0.raw", b"efi_vars.raw"}
    disk = model.lookup(vm_dir, b"disk0.raw")
    assert (disk.size, stat.S_ISREG(disk.mode)) == (data.disk.size, True)
    ids = listdir(model, resolve(model, b"by-id"))
    assert {data.files_snap.id.encode(), data.image_snap.id.encode(), data.big_snap.id.encode()} <= set(ids)
    # A unique prefix of 8+ digits works too, as its own directory (no aliasing of directory inodes).
    short = resolve(model, b"by-id/" + data.files_snap.id[:10].encode())
    assert short != ids[data.files_snap.id.encode()]
    with pytest.raises(OSError) as e:
        resolve(model, b"by-id/" + data.files_snap.id[:5].encode())
    assert e.value.errno == errno.ENOENT


def test_tree_matches_source(model: Vfs, data: Data) -> None:
    src = os.fsencode(data.src)
    top = resolve(model, b"by-host/alpha/" + data.files_snap.time_label().encode() + src)
    assert compare(describe(data.src), describe_model(model, top)) == []
    for rel in (b"random-3m", b"text.txt", b"sparse.img", b"caf\xe9-\xff.bin", b"empty", b"sub/inner.bin"):
        with open(os.path.join(src, rel), "rb") as f:
            assert read_all(model, resolve(model, b"by-host/alpha/" + data.files_snap.time_label().encode() + src
                                           + b"/" + rel)) == f.read(), rel


def test_inodes_are_stable_and_hard_links_share_one(model: Vfs, data: Data) -> None:
    base = b"by-host/alpha/" + data.files_snap.time_label().encode() + os.fsencode(data.src)
    first = {p: resolve(model, base + p) for p in (b"", b"/sub", b"/random-3m", b"/links/hard-1", b"/sub/hard-2")}
    assert first[b"/random-3m"] == first[b"/links/hard-1"] == first[b"/sub/hard-2"]
    assert len({first[b""], first[b"/sub"], first[b"/random-3m"]}) == 3
    before = model.known_inodes()
    for ino in set(first.values()):  # the kernel forgets everything
        model.forget(ino, 1 << 20)
    assert model.known_inodes() < before
    assert {p: resolve(model, base + p) for p in first} == first
    # The same restore point under by-id has its own directory inodes.
    by_id = resolve(model, b"by-id/" + data.files_snap.id.encode() + os.fsencode(data.src) + b"/sub")
    assert by_id != first[b"/sub"]


def test_big_directory_is_paged(data: Data) -> None:
    with data.env.open() as repo:
        pages = len(root_node_of(repo, data)["d"])
        v = Vfs(repo, snapshot=data.big_snap)
        try:
            big = v.lookup(ROOT_INO, b"big").ino
            loads = v._trees.loads
            a = v.lookup(big, big_dir_name(54321))
            assert v._trees.loads - loads == 1, "a lookup must read exactly one directory page"
            assert a.mtime_ns == 1_650_000_000_000_000_000 + 54321
            with pytest.raises(OSError):
                v.lookup(big, b"entry-x")
            # Listing: offsets are stable keys; resuming anywhere yields exactly the rest.
            seq: list[tuple[int, bytes]] = []
            off = 0
            while True:
                batch = v.readdir(big, off, 777)
                seq += [(nxt, name) for nxt, name, _, _ in batch]
                if len(batch) < 777:
                    break
                off = batch[-1][0]
            assert [n for _, n in seq] == [big_dir_name(i) for i in range(BIG_DIR_ENTRIES)]
            assert len(v._trees._d) <= vfsmod.TREE_PAGES_CACHED
            assert v._trees.loads <= pages + 3, "a listing reads each page about once"
            assert v.known_inodes() < 10, "readdir alone must not pin inodes"
            rng = random.Random(3)
            for k in rng.sample(range(len(seq) - 1), 5):
                rest = [name for _, name, _, _ in v.readdir(big, seq[k][0], 10)]
                assert rest == [n for _, n in seq[k + 1 : k + 11]]
        finally:
            v.close()


def root_node_of(repo: object, data: Data) -> dict[str, object]:
    root = root_node(data.big_snap.tree)
    node = TreeReader(repo).lookup(root, b"big")  # type: ignore[arg-type]
    assert node is not None
    return node


def test_image_reads_and_holes(model: Vfs, data: Data) -> None:
    ino = resolve(model, b"vms/vm1/latest/disk0.raw")
    fh = model.open(ino)
    try:
        rng = random.Random(1)
        spec = data.disk
        for off, island in spec.islands[:10]:
            assert bytes(model.read(fh, off - 100, len(island) + 200)) == spec.expected(off - 100, len(island) + 200)
        for _ in range(100):
            off = rng.randrange(0, spec.size)
            n = rng.choice([1, 512, 4096, 65536, 1 << 20, 3 << 20])
            assert bytes(model.read(fh, off, n)) == spec.expected(off, n)
        fetches = model.fetcher.stats["fetches"]
        hole = spec.islands[0][0] + 2 * MiB + 4 * MiB  # islands sit in distinct 4 MiB slots; find a hole
        while spec.expected(hole, MiB) != bytes(MiB):
            hole += 4 * MiB
        assert bytes(model.read(fh, hole, MiB)) == bytes(MiB)
        assert model.fetcher.stats["fetches"] == fetches, "holes are answered without I/O"
        assert bytes(model.read(fh, spec.size - 10, 100)) == spec.expected(spec.size - 10, 10)
        assert model.read(fh, spec.size, 100) == b""
        runs = model.handle(fh).reader.extents()
        assert sum(ln for _, ln, _ in runs) == spec.size
        assert any(not has for _, _, has in runs) and any(has for _, _, has in runs)
    finally:
        model.release(fh)


def test_sequential_reads_prefetch(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    spec = make_image_spec(64 * MiB, 0)
    spec.islands = [(0, random.Random(2).randbytes(32 * MiB))]
    with env.open() as repo:
        snap = store_image(repo, "seq", {"d": spec})
        v = Vfs(repo, snapshot=snap, cache_bytes=64 * MiB)
        try:
            ino = v.lookup(ROOT_INO, b"d.raw").ino
            fh = v.open(ino)
            h = v.handle(fh)
            for off in range(0, 32 * MiB, MiB):
                h.after_read(off, MiB)  # what ops.read does before reading
                assert bytes(h.read(off, MiB)) == spec.expected(off, MiB)
            st = v.fetcher.stats
            assert st["prefetches"] > 0 and st["hits"] + st["waits"] > 0, st
        finally:
            v.close()


def test_nowait_raises_before_changing_state(data: Data) -> None:
    with data.env.open() as repo:
        v = Vfs(repo, snapshot=data.big_snap)
        try:
            big = v.lookup(ROOT_INO, b"big").ino
            n = v.known_inodes()
            with pytest.raises(WouldBlock):
                call_nowait(v.lookup, big, big_dir_name(99_999))
            assert v.known_inodes() == n
            v.lookup(big, big_dir_name(99_999))
            assert call_nowait(v.lookup, big, big_dir_name(99_998)).ino  # same page, now cached
        finally:
            v.close()


def test_new_restore_points_appear_after_refresh(data: Data) -> None:
    now = [0.0]
    with data.env.open() as repo:
        v = Vfs(repo, clock=lambda: now[0])
        try:
            hosts = resolve(v, b"by-host")
            assert b"modelhost" not in listdir(v, hosts)
            first = store_big_dir(repo, 3, host="modelhost")
            now[0] += 0.5
            assert b"modelhost" not in listdir(v, hosts), "re-scans are rate-limited"
            now[0] += 2
            assert b"modelhost" in listdir(v, hosts)
            latest = v.lookup(resolve(v, b"by-host/modelhost"), b"latest")
            second = store_big_dir(repo, 4, host="modelhost")
            now[0] += 2
            entries = listdir(v, resolve(v, b"by-host/modelhost"))
            assert len(entries) == 3
            new_latest = v.lookup(resolve(v, b"by-host/modelhost"), b"latest")
            assert new_latest.ino != latest.ino, "a moved link is a new inode"
            target = v.readlink(new_latest.ino)
            assert target != first.time_label().encode() or target.endswith(second.short_id.encode())
        finally:
            v.close()


def test_damaged_chunk_fails_only_its_range(tmp_path: Path) -> None:
    env = make_env(tmp_path, pack_size=64 * 1024)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(random.Random(4).randbytes(12 * MiB))
    from repo.backup import BackupOptions, backup_paths

    with env.open() as repo:
        snap = backup_paths(repo, [str(src)], BackupOptions(host="h"))
        node = TreeReader(repo).resolve(root_node(snap.tree), str(src / "f"))
        content = node["c"]
        assert len(content) >= 3
        cid, _ = content[1]
        loc = repo.index.get_chunk(cid)
        path = os.path.join(env.repo, fmt.pack_name(loc.pack))
        with open(path, "r+b") as f:
            f.seek(loc.offset + loc.length // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
        v = Vfs(repo, snapshot=snap)
        try:
            ino = resolve(v, os.fsencode(src / "f"))
            fh = v.open(ino)
            start1 = content[0][1]
            data = (src / "f").read_bytes()
            assert bytes(v.read(fh, 0, 4096)) == data[:4096]
            with pytest.raises(DamagedChunk) as e:
                v.read(fh, start1 + 10, 4096)
            assert e.value.chunk_id == cid
            after = start1 + content[1][1]
            assert bytes(v.read(fh, after, 4096)) == data[after : after + 4096]
        finally:
            v.close()


def test_disk_children_hook(data: Data, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    def provider(ctx: DiskContext) -> list[tuple[bytes, LinkNode]]:
        seen.append(ctx.disk.name)
        if ctx.disk.name != "disk0":
            raise OSError(errno.EIO, "no partition table")
        name = ctx.disk.name.encode() + b".test-extra"
        assert ctx.reader().read_at(ctx.disk.size - 10, 100) == data.disk.expected(data.disk.size - 10, 10)
        return [(name, LinkNode(ctx.child_ino(name), ctx.vfs, b"placeholder", ctx.snapshot.time_ns)),
                (b"disk0.raw", LinkNode(ctx.child_ino(b"x"), ctx.vfs, b"clash", 0))]

    remove = register_disk_children(provider)
    try:
        with data.env.open() as repo:
            v = Vfs(repo, snapshot=data.image_snap)
            try:
                names = set(listdir(v, ROOT_INO))
                assert {b"disk0.raw", b"efi_vars.raw", b"disk0.test-extra"} <= names
                assert not stat.S_ISLNK(v.lookup(ROOT_INO, b"disk0.raw").mode), "a clash never hides the raw disk"
                assert sorted(seen) == ["disk0", "efi/vars"]
                assert "no partition table" in caplog.text and "clashes" in caplog.text
            finally:
                v.close()
    finally:
        remove()
