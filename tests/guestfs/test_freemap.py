"""The free-extent map must never contain a byte a live file needs.

Three independent checks against the e2fsprogs/dosfstools reference tools:

* equality with ``dumpe2fs``'s per-group free block lists (libext2fs computes those, including
  ``BLOCK_UNINIT`` groups);
* the blocks of every live file (``debugfs blocks``) are outside the map, and the blocks of the
  deleted 8 MiB file are inside it;
* poisoning every "free" byte of a copy leaves ``e2fsck -fn``/``fsck.vfat -n`` clean and every
  file's sha256 unchanged - also for a crash-consistent image whose journal needs replay.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from repo.guestfs import FileByteSource, SliceSource, align_extents, find_free_extents
from repo.guestfs.freemap import volume_free_extents
from repo.guestfs.volumes import find_volumes
from tests.guestfs import images as im
from tests.guestfs.conftest import Images

MiB = im.MiB


def _dumpe2fs_free(img: Path, base: int) -> list[tuple[int, int]]:
    out = im.run("dumpe2fs", img)
    bs = int(re.search(r"Block size:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    ranges = []
    for line in out.splitlines():
        m = re.match(r"\s+Free blocks: (.*)$", line)  # group lines are indented; the header is not
        if not m:
            continue
        for part in filter(None, (p.strip() for p in m.group(1).split(","))):
            a, _, b = part.partition("-")
            ranges.append((base + int(a) * bs, (int(b or a) - int(a) + 1) * bs))
    merged: list[tuple[int, int]] = []
    for off, length in sorted(ranges):
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((off, length))
    return merged


def _extract(disk: Path, offset: int, size: int, out: Path) -> Path:
    with open(disk, "rb") as src, open(out, "wb") as dst:
        src.seek(offset)
        dst.write(src.read(size))
    return out


def _rdump_sums(img: Path, dest: Path) -> dict[str, str]:
    dest.mkdir()
    im.run("debugfs", "-R", f"rdump / {dest}", img)
    sums = {}
    for root, _dirs, files in os.walk(dest):
        for name in files:
            p = Path(root) / name
            if not p.is_symlink():
                sums["/" + str(p.relative_to(dest))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return sums


def _in_extents(offset: int, extents: list[tuple[int, int]]) -> bool:
    return any(o <= offset < o + n for o, n in extents)


def test_ext4_free_map_matches_e2fsprogs_and_spares_live_files(images: Images, tmp_path: Path) -> None:
    disk = images.gpt
    fm = find_free_extents(FileByteSource(disk))
    by_index = {v.index: v for v in fm.volumes}
    assert by_index[2].fs == "ext" and by_index[2].free_bytes > 0
    assert by_index[3].free_bytes == 0 and by_index[4].free_bytes == 0  # LUKS and garbage: all used

    base = images.ext4_part_offset
    ext_extents = [(o, n) for o, n in fm.extents if base <= o < base + 48 * MiB]
    assert ext_extents == _dumpe2fs_free(images.ext4_fs, base)

    bs = 4096
    deleted = images.ext4_part_deleted_blocks
    assert len(deleted) == 8 * MiB // bs
    assert all(fm.is_free(base + b * bs, bs) for b in deleted), "blocks of the deleted file must be free"
    live = ["/keep.bin", *(f.path for f in images.tree.files)]
    for path in live:
        for block in im.run("debugfs", "-R", f"blocks {path}", images.ext4_fs).split():
            assert not _in_extents(base + int(block) * bs, fm.extents), f"{path} block {block} reported free"

    poisoned = im.poisoned_copy(disk, fm.extents, tmp_path / "poisoned.img")
    part = _extract(poisoned, base, 48 * MiB, tmp_path / "part.img")
    proc = subprocess.run(["e2fsck", "-fn", part], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before = _rdump_sums(images.ext4_fs, tmp_path / "before")
    after = _rdump_sums(part, tmp_path / "after")
    assert before == after and "/big.bin" in after and "/keep.bin" in after

    disk_size = disk.stat().st_size
    print(
        f"\next4 free-space map: {by_index[2].free_bytes / MiB:.1f} MiB of the 48 MiB partition free; "
        f"whole {disk_size / MiB:.0f} MiB disk: {fm.free_bytes / MiB:.1f} MiB skippable "
        f"({100 * fm.free_bytes / disk_size:.0f}%)"
    )


def test_fat_free_map_spares_live_files(images: Images, tmp_path: Path) -> None:
    for disk, index in ((images.gpt, 1), (images.mbr, 1), (images.mbr, 6)):
        table = find_volumes(FileByteSource(disk))
        vol = next(v for v in table.volumes if v.index == index)
        kind, rel, note = volume_free_extents(vol)
        assert kind == "vfat" and rel, note
        extents = [d for off, n in rel for d in vol.disk_ranges(off, n)]
        poisoned = im.poisoned_copy(disk, extents, tmp_path / f"fat-{index}.img")
        part = _extract(poisoned, vol.start, vol.size, tmp_path / f"fat-{index}-part.img")
        proc = subprocess.run(["fsck.vfat", "-n", part], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for f in images.fat_tree.files:
            out = tmp_path / "out.bin"
            im.run("mcopy", "-n", "-i", part, "::" + f.path, out)
            assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(f.data).hexdigest(), f.path
            out.unlink()
        os.unlink(poisoned)


def test_ext2_1k_blocks_matches_dumpe2fs(images: Images, tmp_path: Path) -> None:
    table = find_volumes(FileByteSource(images.mbr))
    vol = next(v for v in table.volumes if v.index == 5)
    fm = find_free_extents(FileByteSource(images.mbr))
    got = [(o, n) for o, n in fm.extents if vol.start <= o < vol.start + vol.size]
    part = _extract(images.mbr, vol.start, vol.size, tmp_path / "ext2.img")
    assert got == _dumpe2fs_free(part, vol.start)


def test_crash_consistent_ext4_keeps_journaled_allocations(images: Images, tmp_path: Path) -> None:
    crash, sums = im.make_crash_ext4(tmp_path)
    assert "needs_recovery" in im.run("dumpe2fs", "-h", crash)
    fm = find_free_extents(FileByteSource(crash))
    assert fm.free_bytes > 30 * MiB
    poisoned = im.poisoned_copy(crash, fm.extents, tmp_path / "poisoned.img")
    replay = subprocess.run(["e2fsck", "-fy", poisoned], capture_output=True, text=True, check=False)
    assert replay.returncode in (0, 1), replay.stdout + replay.stderr  # 1: fixed summary counters
    clean = subprocess.run(["e2fsck", "-fn", poisoned], capture_output=True, text=True, check=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    got = _rdump_sums(poisoned, tmp_path / "out")
    assert got == {f"/{name}": digest for name, digest in sums.items()}


def test_xfs_and_ntfs_of_the_shared_images_are_evaluated(images: Images) -> None:
    """Details and the safety checks are in test_freemap_xfs_ntfs.py; here: the dispatch works."""
    xfs = find_free_extents(FileByteSource(images.xfs))
    assert xfs.volumes[0].fs == "xfs" and xfs.volumes[0].note == "" and xfs.free_bytes > 200 * MiB
    mbr = find_free_extents(FileByteSource(images.mbr))
    ntfs = next(v for v in mbr.volumes if v.index == 2)
    assert ntfs.fs == "ntfs" and ntfs.note == "" and ntfs.free_bytes > 0
    assert all(v.free_bytes == 0 for v in mbr.volumes if v.fs == "")  # the extended partition container


def test_damaged_bitmap_checksum_makes_group_used(images: Images, tmp_path: Path) -> None:
    img = tmp_path / "ext4.img"
    shutil.copyfile(images.ext4_fs, img)
    before = find_free_extents(FileByteSource(img))
    group_bytes = 4096 * 4096  # -g 4096 with 4 KiB blocks
    out = im.run("dumpe2fs", img)
    bitmaps = [int(b) for b in re.findall(r"Block bitmap at (\d+)", out)]
    # a group with both used and free blocks, so its bitmap has set bits to clear
    group = next(
        g for g in range(1, len(bitmaps)) if 0 < _free_in(before.extents, g, group_bytes) < group_bytes
    )
    with open(img, "r+b") as f:
        f.seek(bitmaps[group] * 4096)
        data = bytearray(f.read(512))
        idx = next(i for i, b in enumerate(data) if b)
        data[idx] = 0  # clears used bits: without the checksum these blocks would read as free
        f.seek(bitmaps[group] * 4096)
        f.write(data)
    after = find_free_extents(FileByteSource(img))
    assert _free_in(after.extents, group, group_bytes) == 0
    assert after.free_bytes == before.free_bytes - _free_in(before.extents, group, group_bytes)


def _free_in(extents: list[tuple[int, int]], group: int, group_bytes: int) -> int:
    lo, hi = group * group_bytes, (group + 1) * group_bytes
    return sum(max(0, min(o + n, hi) - max(o, lo)) for o, n in extents)


def test_align_extents_rounds_inwards() -> None:
    assert align_extents([(100, 10_000), (65536, 65536 * 3 + 5)], 4096) == [(4096, 4096), (65536, 65536 * 3)]
    assert align_extents([(1, 4095)], 4096) == []


def test_slice_mapping_of_free_extents(images: Images) -> None:
    src = FileByteSource(images.gpt)
    vol = next(v for v in find_volumes(src).volumes if v.index == 2)
    assert isinstance(vol.source, SliceSource)
    assert vol.disk_ranges(4096, 8192) == [(vol.start + 4096, 8192)]
    assert vol.disk_ranges(vol.size - 10, 100) == [(vol.start + vol.size - 10, 10)]


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 200_000])
def test_source_reader_cache(images: Images, size: int) -> None:
    from repo.guestfs import SourceReader

    src = FileByteSource(images.gpt)
    r = SourceReader(src)
    r.seek(123_456)
    assert r.read(size) == src.read_at(123_456, size)
    assert r.tell() == 123_456 + size
    r.seek(-10, os.SEEK_END)
    assert r.read(100) == src.read_at(src.size - 10, 10)
