"""`ihb restore-file`: copy files out of a VM image restore point, read in-process (no loop device,
no mount, no helper VM), from ext2/3/4, XFS, FAT, exFAT or NTFS inside MBR/GPT/LVM."""

from __future__ import annotations

import os
import stat

import click

from repo.errors import InvalidArgument, PathNotFound, RestoreTargetExists
from repo.guestfs import GuestFS, open_disk
from repo.image import ImageReader
from repo.restore import check_name

from . import cli
from .common import Ctx, common_options, human_bytes
from .restore_disk_cmd import find_image_snapshot
from .ticket import gate, ticket_option


class ReaderSource:
    """repo.image.ImageReader as a guestfs ByteSource."""

    def __init__(self, reader: ImageReader) -> None:
        self.reader = reader
        self.size = reader.size

    def read_at(self, offset: int, size: int) -> bytes:
        return self.reader.read(offset, size)


def pick_volume(disk, rest: str) -> tuple[GuestFS, str]:  # type: ignore[no-untyped-def]
    comps = [c for c in rest.split("/") if c]
    names = {dv.name: dv for dv in disk.volumes}
    if comps and comps[0] in names:
        dv = names[comps[0]]
        if dv.fs is None:
            raise InvalidArgument(f"volume {dv.name} cannot be read: {dv.reason}")
        return dv.fs, "/" + "/".join(comps[1:])
    fss = disk.filesystems()
    if len(fss) == 1:
        assert fss[0].fs is not None
        return fss[0].fs, "/" + "/".join(comps)
    listing = ", ".join(f"{dv.name}" + (f" ({dv.reason})" if dv.fs is None else "") for dv in disk.volumes)
    raise InvalidArgument(f"say which volume: DISK:VOLUME/path, one of: {listing or 'none found'}")


def _copy(fs: GuestFS, path: str, dest: str, overwrite: bool, stats: dict[str, int]) -> None:
    st = fs.stat(path)
    if st.is_dir:
        os.makedirs(dest, exist_ok=True)
        for name in fs.listdir(path):
            check_name(name.encode("utf-8", "surrogateescape"))
            _copy(fs, path.rstrip("/") + "/" + name, os.path.join(dest, name), overwrite, stats)
        os.chmod(dest, stat.S_IMODE(st.mode) or 0o755)
        os.utime(dest, ns=(st.atime_ns, st.mtime_ns))
        return
    if os.path.lexists(dest):
        if not overwrite:
            raise RestoreTargetExists(f"{dest} exists; pass --overwrite or choose another target")
        os.unlink(dest)
    if st.is_symlink:
        os.symlink(fs.readlink(path), dest)
        return
    if not st.is_file:
        return  # devices, fifos inside a guest are not copied out
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        f = fs.open(path)
        pos = 0
        for chunk in f.iter_chunks(4 << 20):
            os.pwrite(fd, chunk, pos)
            pos += len(chunk)
        os.ftruncate(fd, st.size)
        if os.geteuid() == 0:
            os.fchown(fd, st.uid, st.gid)
        os.fchmod(fd, stat.S_IMODE(st.mode))
        os.utime(fd, ns=(st.atime_ns, st.mtime_ns))
    except BaseException:
        os.close(fd)
        os.unlink(dest)
        raise
    os.close(fd)
    stats["files"] += 1
    stats["bytes"] += st.size


@cli.command("restore-file")
@common_options
@click.argument("ref")
@click.argument("source")
@click.argument("target", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace existing files in TARGET.")
@ticket_option
def restore_file(ctx: Ctx, ref: str, source: str, target: str, overwrite: bool, ticket: str | None) -> None:
    """Copy SOURCE (DISK:/path or DISK:VOLUME/path) out of the disk image of REF (VM@SNAPSHOT) to TARGET.

    A directory is copied with everything below it; an existing directory TARGET receives the file.
    """
    if ":" not in source:
        raise InvalidArgument("SOURCE must look like DISK:/path/in/guest, e.g. vda:/etc/hostname")
    disk_name, rest = source.split(":", 1)
    with ctx.open_repo() as repo:
        snap = find_image_snapshot(repo, ref)
        rec = next((d for d in snap.disks if d.name == disk_name), None)
        if rec is None:
            raise InvalidArgument(f"restore point {snap.short_id} has no disk {disk_name!r}")
        disk = open_disk(ReaderSource(ImageReader(repo, rec)))
        fs, path = pick_volume(disk, rest)
        if not fs.exists(path):
            raise PathNotFound(f"{path} does not exist in {disk_name} of {snap.vm}@{snap.short_id}")
        dest = target
        if os.path.isdir(target) and path != "/":
            dest = os.path.join(target, os.path.basename(path.rstrip("/")))
        stats = {"files": 0, "bytes": 0}
        with gate(ctx, snap, kind=("files", "in-place"), paths=[source], target=target, ticket=ticket):
            _copy(fs, path, dest, overwrite, stats)
    ctx.emit({"snapshot": snap.id, "source": source, "target": dest, **stats},
             lambda: click.echo(f"restored {stats['files']} files ({human_bytes(stats['bytes'])}) from "
                                f"{snap.vm}@{snap.short_id} {source} to {dest}"))
