"""Partitions, file-system contents and failure reasons, on images made by the real tools."""

from __future__ import annotations

import hashlib
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from repo.guestfs import (
    DamagedFilesystem,
    FileByteSource,
    FileType,
    GuestFS,
    find_free_extents,
    open_disk,
    open_filesystem,
)
from repo.guestfs.volumes import find_volumes
from tests.guestfs import images as im
from tests.guestfs.conftest import Images

MiB = im.MiB


def _check_tree(fs: GuestFS[Any], tree: im.Tree, *, mtime_resolution_ns: int, symlinks: bool) -> None:
    """Every file of the source tree is there with the same bytes, size and mtime."""
    top = set(fs.listdir("/"))
    expected_top = {p.strip("/").split("/")[0] for p in [f.path for f in tree.files] + tree.dirs}
    if symlinks:
        expected_top |= {p.strip("/") for p in tree.symlinks if p.count("/") == 1}
    assert expected_top <= top, f"missing: {expected_top - top}"
    for f in tree.files:
        st = fs.stat(f.path)
        assert st.type is FileType.REG, f.path
        assert stat.S_ISREG(st.mode)
        assert st.size == len(f.data), f.path
        assert abs(st.mtime_ns - f.mtime * 1_000_000_000) < mtime_resolution_ns, (f.path, st.mtime_ns)
        data = fs.open(f.path).read_all()
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(f.data).hexdigest(), f.path
    for d in tree.dirs:
        assert fs.stat(d).is_dir, d
    assert sorted(fs.listdir("/dir/many")) == [f"file-{i:03d}.dat" for i in range(40)]
    assert "ñandú €.txt" in set(fs.listdir("/dir"))
    if symlinks:
        for link, target in tree.symlinks.items():
            st = fs.stat(link)
            assert st.type is FileType.LNK, link
            assert fs.readlink(link) == target
        # intermediate symlinks are followed inside the guest, relative and absolute
        assert fs.open("/link").read_all() == b"hello, guest\n"
        assert fs.open("/abslink/deep.txt").read_all() == b"deep file\n" * 100
        assert fs.open("/dir/up").read_all() == b"hello, guest\n"
    with pytest.raises(FileNotFoundError):
        fs.stat("/no/such/file")
    with pytest.raises(NotADirectoryError):
        list(fs.listdir("/hello.txt"))
    with pytest.raises(IsADirectoryError):
        fs.open("/dir")


def test_gpt_layout_matches_sfdisk(images: Images) -> None:
    table = find_volumes(FileByteSource(images.gpt))
    assert table.scheme == "gpt"
    ref = im.sfdisk_json(images.gpt)
    assert [(v.index, v.start, v.size) for v in table.volumes] == [
        (i + 1, int(p["start"]) * 512, int(p["size"]) * 512) for i, p in enumerate(ref)
    ]
    assert [v.name for v in table.volumes] == ["EFI system", "root", "secret", "junk"]
    assert table.volumes[0].type == "EFI System"
    assert table.volumes[2].type == "Linux LUKS"


def test_mbr_layout_with_logical_partitions(images: Images) -> None:
    table = find_volumes(FileByteSource(images.mbr))
    assert table.scheme == "mbr"
    ref = {int(p["node"].rsplit("img", 1)[1]): p for p in im.sfdisk_json(images.mbr)}  # type: ignore[union-attr]
    got = {v.index: v for v in table.volumes}
    assert sorted(got) == [1, 2, 5, 6]  # the extended container itself is not a volume
    for n, v in got.items():
        assert (v.start, v.size) == (int(ref[n]["start"]) * 512, int(ref[n]["size"]) * 512)  # type: ignore[call-overload]


def test_gpt_disk_tree(images: Images) -> None:
    disk = open_disk(FileByteSource(images.gpt))
    assert [dv.name for dv in disk.volumes] == ["p1-vfat", "p2-ext4", "p3-luks", "p4-unknown"]
    efi, root, luks, junk = disk.volumes
    assert efi.fs is not None and root.fs is not None
    assert efi.fs.label == "EFI"
    _check_tree(efi.fs, images.fat_tree, mtime_resolution_ns=2_000_000_000, symlinks=False)
    _check_tree(root.fs, images.tree, mtime_resolution_ns=1, symlinks=True)
    assert root.fs.xattrs("/hello.txt")["user.comment"] == b"guest xattr"
    assert not root.fs.exists("/deleted.bin")
    st = root.fs.stat("/hello.txt")
    assert (st.uid, st.gid, st.nlink) == (0, 0, 1) and st.ino > 11
    assert luks.fs is None and luks.reason is not None and luks.reason.startswith("LUKS-encrypted volume")
    assert (
        junk.fs is None
        and junk.reason is not None
        and junk.reason.startswith("unknown filesystem (first bytes")
    )
    assert "not readable: LUKS-encrypted volume" in luks.note()


def test_mbr_disk_tree(images: Images) -> None:
    disk = open_disk(FileByteSource(images.mbr))
    assert [dv.name for dv in disk.volumes] == ["p1-vfat", "p2-ntfs", "p5-ext2", "p6-vfat"]
    fat16, ntfs, ext2, fat12 = (dv.fs for dv in disk.volumes)
    assert fat16 is not None and ntfs is not None and ext2 is not None and fat12 is not None
    assert (fat16.variant, fat12.variant) == ("fat16", "fat12")  # type: ignore[attr-defined]
    _check_tree(fat16, images.fat_tree, mtime_resolution_ns=2_000_000_000, symlinks=False)
    _check_tree(fat12, images.fat_tree, mtime_resolution_ns=2_000_000_000, symlinks=False)
    _check_tree(ntfs, images.tree, mtime_resolution_ns=100, symlinks=True)
    assert ntfs.label == "WINDATA"
    assert not any(name.startswith("$") for name in ntfs.listdir("/"))
    _check_tree(ext2, images.tree, mtime_resolution_ns=1_000_000_000, symlinks=True)
    # case-insensitive lookup on Windows file systems only
    assert ntfs.open("/HELLO.TXT").read_all() == b"hello, guest\n"
    assert fat16.stat("/DIR/SUB/DEEP.TXT").size == 1000
    with pytest.raises(FileNotFoundError):
        ext2.stat("/HELLO.TXT")


def test_partitionless_disks(images: Images) -> None:
    xfs = open_disk(FileByteSource(images.xfs))
    assert xfs.scheme == "none" and [dv.name for dv in xfs.volumes] == ["fs"]
    fs = xfs.volumes[0].fs
    assert fs is not None and fs.kind == "xfs" and fs.label == "xfsdata"
    _check_tree(fs, images.tree, mtime_resolution_ns=1, symlinks=True)
    assert fs.xattrs("/hello.txt") == {"user.comment": b"guest xattr"}
    pre = fs.open("/prealloc.bin")
    assert pre.size == 3 * MiB and pre.read_all() == b"head" + bytes(3 * MiB - 4)

    fat = open_disk(FileByteSource(images.fat_whole))  # a FAT boot sector also ends in 55 AA
    assert fat.scheme == "none" and [dv.name for dv in fat.volumes] == ["fs"]
    assert fat.volumes[0].fs is not None
    _check_tree(fat.volumes[0].fs, images.fat_tree, mtime_resolution_ns=2_000_000_000, symlinks=False)

    ex = open_disk(FileByteSource(images.exfat))
    exfs = ex.volumes[0].fs
    assert exfs is not None and exfs.kind == "exfat"
    _check_tree(exfs, images.fat_tree, mtime_resolution_ns=10_000_000, symlinks=False)


def test_lvm_logical_volume(images: Images) -> None:
    im.require("pvcreate")
    disk_path, pieces = im.make_lvm(images.work, images.tree)
    disk = open_disk(FileByteSource(disk_path))
    names = [dv.name for dv in disk.volumes]
    assert names == ["p1-lvm", "lvm-vgt-root-ext4"], names
    lv = disk.volume("lvm-vgt-root-ext4")
    assert lv.volume.extents == tuple(pieces)
    assert lv.fs is not None
    _check_tree(lv.fs, images.tree, mtime_resolution_ns=1, symlinks=True)
    # free space of the LV is reported at its scattered physical location on the disk
    fm = find_free_extents(FileByteSource(disk_path))
    assert fm.free_bytes > 0
    for off, length in fm.extents:
        assert any(p <= off and off + length <= p + n for p, n in pieces), (off, length)
    lv_free = {v.fs: v.free_bytes for v in fm.volumes}
    assert lv_free == {"": 0, "ext": fm.free_bytes}


def test_damaged_ext4_superblock(images: Images, tmp_path: Path) -> None:
    bad = tmp_path / "bad.img"
    data = bytearray(images.ext4_fs.read_bytes()[: 4 * MiB])
    data[1024 + 0x50] ^= 0xFF  # inside the superblock, covered by its metadata_csum
    bad.write_bytes(bytes(data))
    with pytest.raises(DamagedFilesystem) as info:
        open_filesystem(FileByteSource(bad))
    assert info.value.reason == "damaged ext4 superblock: checksum mismatch"


def test_backup_gpt_is_used_when_primary_is_damaged(images: Images, tmp_path: Path) -> None:
    disk = tmp_path / "gpt.img"
    with open(images.gpt, "rb") as f:
        head = f.read(34 * 512)
    with open(disk, "wb") as f:
        f.truncate(images.gpt.stat().st_size)
    im.copy_into(disk, images.gpt, 0)
    with open(disk, "r+b") as f:
        f.seek(512 + 16)  # header CRC of the primary GPT
        f.write(bytes(4))
    assert head  # the primary was valid before
    table = find_volumes(FileByteSource(disk))
    assert table.scheme == "gpt" and len(table.volumes) == 4


def test_concurrent_reads_and_throughput(images: Images) -> None:
    disk = open_disk(FileByteSource(images.gpt))
    fs = disk.volume("p2-ext4").fs
    assert fs is not None
    want = images.tree.sha256("/big.bin")
    errors: list[str] = []

    def worker(n: int) -> None:
        f = fs.open("/big.bin")
        h = hashlib.sha256()
        for chunk in f.iter_chunks(128 * 1024 + n):  # odd sizes: reads straddle extents
            h.update(chunk)
        if h.hexdigest() != want:
            errors.append(f"thread {n}: sha mismatch")
        for name in fs.listdir("/dir/many"):
            fs.stat(f"/dir/many/{name}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    f = fs.open("/big.bin")
    start = time.perf_counter()
    total = sum(len(c) for c in f.iter_chunks(1 << 20))
    elapsed = time.perf_counter() - start
    print(f"\nread throughput through GuestFile.read_at: {total / elapsed / 1e6:.0f} MB/s ({total} bytes)")
    assert total == im.BIG_SIZE
