"""Build real guest disk images with the Debian tools, once per test session.

Why real tools and not hand-made bytes: guestfs must read what mkfs, the Linux kernel, ntfs-3g
and mtools actually write. Every image is produced by the reference implementation of its
format; the expected contents come from the source tree (``TREE``) they were filled from.

A missing tool fails the session with the package to install (CI must not skip silently).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MiB = 1 << 20

#: tool -> Debian package, for the failure message.
TOOLS = {
    "sfdisk": "fdisk",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "mkfs.vfat": "dosfstools",
    "fsck.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "mkntfs": "ntfs-3g",
    "ntfs-3g": "ntfs-3g",
    "mkfs.exfat": "exfatprogs",
    "mount.exfat-fuse": "exfat-fuse",
    "cryptsetup": "cryptsetup-bin",
    "losetup": "mount",
    "pvcreate": "lvm2",
    "fusermount": "fuse3",
}

FIXED_MTIME = 1614834368  # 2021-03-04 05:06:08 UTC, an even second (FAT has 2 s resolution)
BIG_SIZE = 6 * MiB + 12345


def require(*tools: str) -> None:
    """Fail (not skip) when a tool is missing, naming the Debian package that provides it."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pkgs = sorted({TOOLS.get(t, t) for t in missing})
        pytest.fail(
            f"required tools missing: {', '.join(missing)}; install with: apt-get install {' '.join(pkgs)}"
        )


def run(*args: str | os.PathLike[str], stdin: bytes | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command; on failure, fail the test with its output."""
    cmd = [os.fspath(a) for a in args]
    full_env = {**os.environ, "TZ": "UTC", "LC_ALL": "C.UTF-8", **(env or {})}
    proc = subprocess.run(cmd, input=stdin, capture_output=True, env=full_env, check=False)
    if proc.returncode != 0:
        pytest.fail(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"stdout: {proc.stdout.decode(errors='replace')}\nstderr: {proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout.decode(errors="replace")


@dataclass
class TreeFile:
    path: str  # guest path, "/"-rooted
    data: bytes
    mtime: int = FIXED_MTIME


@dataclass
class Tree:
    """The content every test file system is filled with."""

    root: Path
    files: list[TreeFile] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    symlinks: dict[str, str] = field(default_factory=dict)

    def sha256(self, path: str) -> str:
        for f in self.files:
            if f.path == path:
                return hashlib.sha256(f.data).hexdigest()
        raise KeyError(path)


def make_tree(base: Path, *, symlinks: bool) -> Tree:
    rnd = random.Random(1234)
    tree = Tree(base)
    tree.dirs = ["/dir", "/dir/sub", "/dir/ñandú €"]
    tree.files = [
        TreeFile("/hello.txt", b"hello, guest\n"),
        TreeFile("/empty.txt", b""),
        TreeFile("/big.bin", rnd.randbytes(BIG_SIZE)),
        TreeFile("/dir/sub/deep.txt", b"deep file\n" * 100),
        TreeFile("/dir/ñandú €.txt", "¡hola, señor!\n".encode()),
        TreeFile("/dir/ñandú €/inside.txt", b"inside\n"),
    ]
    for i in range(40):  # enough entries to need more than one directory block on every fs
        tree.files.append(TreeFile(f"/dir/many/file-{i:03d}.dat", rnd.randbytes(100 + i)))
    tree.dirs.append("/dir/many")
    if symlinks:
        tree.symlinks = {"/link": "hello.txt", "/abslink": "/dir/sub", "/dir/up": "../hello.txt"}
    for d in tree.dirs:
        (base / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for f in tree.files:
        p = base / f.path.lstrip("/")
        p.write_bytes(f.data)
        os.utime(p, (f.mtime, f.mtime))
    for link, target in tree.symlinks.items():
        os.symlink(target, base / link.lstrip("/"))
    # copied into ext images by ``mkfs.ext4 -d``
    os.setxattr(base / "hello.txt", "user.comment", b"guest xattr")
    return tree


def partition_disk(path: Path, size: int, table: str, parts: list[tuple[int, int, str, str]]) -> None:
    """Create ``path`` with an sfdisk table; parts are ``(start_MiB, size_MiB, type, name)``."""
    with open(path, "wb") as f:
        f.truncate(size)
    lines = [f"label: {table}"]
    for start, length, ptype, name in parts:
        line = f"start={start * 2048}, size={length * 2048}, type={ptype}"
        if name:
            line += f', name="{name}"'
        lines.append(line)
    run("sfdisk", "-q", "--no-reread", path, stdin=("\n".join(lines) + "\n").encode())


def sfdisk_json(path: Path) -> list[dict[str, object]]:
    return json.loads(run("sfdisk", "-J", path))["partitiontable"]["partitions"]  # type: ignore[no-any-return]


def copy_into(disk: Path, image: Path, offset: int) -> None:
    """Write ``image`` into ``disk`` at ``offset``, keeping holes sparse."""
    with open(image, "rb") as src, open(disk, "r+b") as dst:
        pos = 0
        while True:
            chunk = src.read(MiB)
            if not chunk:
                break
            if any(chunk):
                dst.seek(offset + pos)
                dst.write(chunk)
            pos += len(chunk)


def poisoned_copy(img: Path, extents: list[tuple[int, int]], out: Path, poison: int = 0xA5) -> Path:
    """A copy of ``img`` with every byte of ``extents`` overwritten: what a backup that skipped them restores."""
    shutil.copyfile(img, out)
    fd = os.open(out, os.O_WRONLY)
    try:
        for off, length in extents:
            os.pwrite(fd, bytes([poison]) * length, off)
    finally:
        os.close(fd)
    return out


def fs_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def make_ext(work: Path, tree: Tree, name: str, size_mib: int, *opts: str, deleted: int = 0) -> Path:
    """``mkfs.ext4 -d`` of the tree; with ``deleted``, add and then ``debugfs rm`` a file that big."""
    img = fs_image(work / f"{name}.img", size_mib * MiB)
    src = tree.root
    if deleted:
        src = work / f"{name}-src"
        shutil.copytree(tree.root, src, symlinks=True)
        (src / "deleted.bin").write_bytes(random.Random(99).randbytes(deleted))
        (src / "keep.bin").write_bytes(random.Random(98).randbytes(deleted // 2))
    run("mkfs.ext4", "-q", "-F", *opts, "-d", src, img)
    if deleted:
        blocks = run("debugfs", "-R", "blocks /deleted.bin", img).split()
        (work / f"{name}.deleted-blocks").write_text(" ".join(blocks))
        run("debugfs", "-w", "-R", "rm /deleted.bin", img)
        shutil.rmtree(src)
    return img


def make_fat(work: Path, tree: Tree, name: str, size_mib: int, fat_bits: int) -> Path:
    img = fs_image(work / f"{name}.img", size_mib * MiB)
    args = ["-F", str(fat_bits), "-n", name.upper()[:11]]
    if fat_bits == 32:
        args += ["-s", "1", "-S", "512"]
    run("mkfs.vfat", *args, img)
    target = f"{img}"
    for d in tree.dirs:
        run("mmd", "-i", target, "::" + d)
    for f in tree.files:
        run("mcopy", "-m", "-i", target, tree.root / f.path.lstrip("/"), "::" + f.path)
    return img


@contextlib.contextmanager
def fuse_mounted(cmd: list[str], mnt: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    run(*cmd, mnt)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", os.fspath(mnt)], check=False)


def populate(mnt: Path, tree: Tree, *, symlinks: bool = True) -> None:
    for d in tree.dirs:
        (mnt / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for f in tree.files:
        p = mnt / f.path.lstrip("/")
        p.write_bytes(f.data)
    if symlinks:
        for link, target in tree.symlinks.items():
            os.symlink(target, mnt / link.lstrip("/"))
    for f in tree.files:
        os.utime(mnt / f.path.lstrip("/"), (f.mtime, f.mtime))
    os.sync()


def make_ntfs(work: Path, tree: Tree, size_mib: int) -> Path:
    img = fs_image(work / "ntfs.img", size_mib * MiB)
    run("mkntfs", "-q", "-F", "-Q", "-L", "WINDATA", img)
    with fuse_mounted(["ntfs-3g", os.fspath(img)], work / "ntfs-mnt") as mnt:
        populate(mnt, tree)
    return img


def make_exfat(work: Path, tree: Tree, size_mib: int) -> Path:
    img = fs_image(work / "exfat.img", size_mib * MiB)
    run("mkfs.exfat", "-L", "EXDATA", img)
    # as root, exfat-fuse insists on a block device
    with loop_device(img) as dev, fuse_mounted(["mount.exfat-fuse", dev], work / "exfat-mnt") as mnt:
        populate(mnt, tree, symlinks=False)
    return img


@contextlib.contextmanager
def loop_device(img: Path, offset: int = 0, size: int | None = None) -> Iterator[str]:
    args = ["losetup", "--show", "-f"]
    if offset:
        args += ["-o", str(offset)]
    if size is not None:
        args += ["--sizelimit", str(size)]
    dev = run(*args, img).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def make_xfs(work: Path, tree: Tree) -> Path:
    """XFS needs 300 MiB minimum; the image is sparse. Filled through a kernel mount."""
    img = fs_image(work / "xfs.img", 300 * MiB)
    run("mkfs.xfs", "-q", "-f", "-L", "xfsdata", img)
    mnt = work / "xfs-mnt"
    mnt.mkdir(exist_ok=True)
    with loop_device(img) as dev:
        run("mount", "-t", "xfs", dev, mnt)
        try:
            populate(mnt, tree)
            os.setxattr(mnt / "hello.txt", "user.comment", b"guest xattr")
            # preallocated, never written: must read back as zeroes, not stale disk bytes
            with open(mnt / "prealloc.bin", "wb") as f:
                os.posix_fallocate(f.fileno(), 0, 3 * MiB)
                f.write(b"head")
        finally:
            run("umount", mnt)
    return img


def make_crash_ext4(work: Path) -> tuple[Path, dict[str, str]]:
    """Copy a mounted ext4 (journal needs recovery), like a crash-consistent VM snapshot."""
    img = fs_image(work / "live.img", 96 * MiB)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-g", "4096", img)
    mnt = work / "live-mnt"
    mnt.mkdir(exist_ok=True)
    sums: dict[str, str] = {}
    rnd = random.Random(7)
    copy = work / "crash.img"
    with loop_device(img) as dev:
        run("mount", "-t", "ext4", dev, mnt)
        try:
            for i in range(20):
                (mnt / f"f{i}").write_bytes(rnd.randbytes(700_000))
            os.sync()
            (mnt / "f3").unlink()
            for i in range(20, 30):
                data = rnd.randbytes(900_000)
                (mnt / f"f{i}").write_bytes(data)
            os.sync()
            for p in sorted(mnt.iterdir()):
                if p.is_file():
                    sums[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
            shutil.copyfile(img, copy)
        finally:
            run("umount", mnt)
    return copy, sums


LVM_META = """
logical_volumes {
root {
id = "abcdef-ghij-klmn-opqr-stuv-wxyz-012345"
status = ["READ", "WRITE", "VISIBLE"]
flags = []
segment_count = 2
segment1 {
start_extent = 0
extent_count = 2
type = "striped"
stripe_count = 1
stripes = ["pv0", 0]
}
segment2 {
start_extent = 2
extent_count = 2
type = "striped"
stripe_count = 1
stripes = ["pv0", 5]
}
}
}
"""


def make_lvm(work: Path, tree: Tree) -> tuple[Path, list[tuple[int, int]]]:
    """MBR disk, one LVM PV partition, VG ``vgt`` with LV ``root`` in two non-adjacent segments.

    The kernel here has no device-mapper, so the LV is described with ``vgcfgrestore`` and the
    file system is written at the physical extents directly. Returns the disk and the LV's
    expected ``(disk_offset, length)`` pieces.
    """
    disk = work / "lvm.img"
    partition_disk(disk, 48 * MiB, "dos", [(1, 44, "8e", "")])
    env = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
    with loop_device(disk, MiB, 44 * MiB) as dev:
        run("pvcreate", "-q", "-y", dev, env=env)
        run("vgcreate", "-q", "-s", "4m", "vgt", dev, env=env)
        meta = work / "vg.txt"
        run("vgcfgbackup", "-q", "-f", meta, "vgt", env=env)
        text = meta.read_text()
        cut = text.rindex("\n}")
        meta.write_text(text[:cut] + LVM_META + text[cut:])
        subprocess.run(
            ["vgcfgrestore", "-q", "-f", os.fspath(meta), "vgt"],
            capture_output=True,
            env={**os.environ, **env},
        )
        pe_start = int(
            run("pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", dev, env=env).split()[
                0
            ]
        )
        subprocess.run(["vgexport", "-q", "vgt"], capture_output=True, env={**os.environ, **env})
    lv = make_ext(work, tree, "lv-root", 16)
    base = MiB + pe_start
    pieces = [(base + 0 * 4 * MiB, 8 * MiB), (base + 5 * 4 * MiB, 8 * MiB)]
    data = lv.read_bytes()
    with open(disk, "r+b") as f:
        f.seek(pieces[0][0])
        f.write(data[: 8 * MiB])
        f.seek(pieces[1][0])
        f.write(data[8 * MiB :])
    return disk, pieces
