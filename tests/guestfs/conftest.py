"""Session fixtures: every guest image is built once, in one temporary directory."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guestfs import images as im


@dataclass
class Images:
    work: Path
    tree: im.Tree  # with symlinks (ext, xfs, ntfs)
    fat_tree: im.Tree  # without symlinks (FAT, exFAT)
    gpt: Path
    mbr: Path
    xfs: Path
    fat_whole: Path
    exfat: Path
    ext4_part_deleted_blocks: list[int]
    ext4_part_offset: int
    ext4_fs: Path  # the ext4 image before it was copied into the GPT disk


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    if os.geteuid() != 0:
        pytest.fail("guestfs image tests need root (loop devices, kernel XFS mount, FUSE mounts)")
    im.require(
        "sfdisk",
        "mkfs.ext4",
        "debugfs",
        "e2fsck",
        "dumpe2fs",
        "mkfs.xfs",
        "mkfs.vfat",
        "fsck.vfat",
        "mcopy",
        "mmd",
        "mkntfs",
        "ntfs-3g",
        "mkfs.exfat",
        "mount.exfat-fuse",
        "cryptsetup",
        "losetup",
    )
    work = tmp_path_factory.mktemp("guest-images")
    tree = im.make_tree(work / "tree", symlinks=True)
    fat_tree = im.make_tree(work / "fat-tree", symlinks=False)
    MiB = im.MiB

    # GPT: p1 FAT32 "EFI", p2 ext4 (with a deleted 8 MiB file), p3 LUKS1, p4 random garbage.
    gpt = work / "gpt.img"
    im.partition_disk(
        gpt,
        100 * MiB,
        "gpt",
        [
            (1, 34, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "EFI system"),
            (35, 48, "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "root"),
            (83, 8, "CA7D7CCB-63ED-4C53-861C-1742536059CC", "secret"),
            (91, 2, "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "junk"),
        ],
    )
    fat32 = im.make_fat(work, fat_tree, "efi", 34, 32)
    ext4 = im.make_ext(work, tree, "root", 48, "-b", "4096", "-g", "4096", deleted=8 * MiB)
    luks = im.fs_image(work / "luks.img", 8 * MiB)
    im.run(
        "cryptsetup", "luksFormat", "-q", "--type", "luks1", "--pbkdf-force-iterations", "1000",
        "--key-file", "-", luks, stdin=b"passphrase",
    )  # fmt: skip
    junk = work / "junk.img"
    junk.write_bytes(random.Random(5).randbytes(2 * MiB))
    for img, start in ((fat32, 1), (ext4, 35), (luks, 83), (junk, 91)):
        im.copy_into(gpt, img, start * MiB)
    deleted = [int(b) for b in (work / "root.deleted-blocks").read_text().split()]

    # MBR: p1 FAT16, p2 NTFS, p3 extended with p5 ext2 (1 KiB blocks) and p6 FAT12.
    mbr = work / "mbr.img"
    im.partition_disk(
        mbr,
        64 * MiB,
        "dos",
        [(1, 17, "6", ""), (18, 20, "7", ""), (38, 25, "5", ""), (39, 14, "83", ""), (54, 8, "1", "")],
    )
    fat16 = im.make_fat(work, fat_tree, "data16", 17, 16)
    ntfs = im.make_ntfs(work, tree, 20)
    ext2 = im.make_ext(work, tree, "old", 14, "-t", "ext2", "-b", "1024")
    fat12 = im.make_fat(work, fat_tree, "tiny12", 8, 12)
    for img, start in ((fat16, 1), (ntfs, 18), (ext2, 39), (fat12, 54)):
        im.copy_into(mbr, img, start * MiB)

    return Images(
        work=work,
        tree=tree,
        fat_tree=fat_tree,
        gpt=gpt,
        mbr=mbr,
        xfs=im.make_xfs(work, tree),
        fat_whole=im.make_fat(work, fat_tree, "whole", 16, 16),
        exfat=im.make_exfat(work, fat_tree, 16),
        ext4_part_deleted_blocks=deleted,
        ext4_part_offset=35 * MiB,
        ext4_fs=ext4,
    )
