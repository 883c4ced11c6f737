"""`ihb restore-disk`: bare-metal restore of a whole disk from an image restore point."""

from __future__ import annotations

import os
import stat
import sys

import click

from appliance.sla import measured_restore
from repo.errors import InvalidArgument
from repo.image import restore_disk
from repo.snapshot import Snapshot

from . import cli
from .common import Ctx, common_options, human_bytes
from .ticket import gate, ticket_option


def parse_vm_ref(repo_snaps: list[Snapshot], ref: str) -> str:
    """VM@SNAPSHOT -> snapshot ref understood by Repository.get_snapshot (VM@latest, or an id)."""
    if "@" not in ref:
        return ref
    vm, sid = ref.split("@", 1)
    if sid == "latest":
        return f"{vm}@latest"
    return sid


def find_image_snapshot(ctx_repo, ref: str) -> Snapshot:  # type: ignore[no-untyped-def]
    snap = ctx_repo.get_snapshot(parse_vm_ref([], ref))
    if snap.kind != "image":
        raise InvalidArgument(f"restore point {snap.short_id} is a file-level backup, not a VM image")
    if "@" in ref and ref.split("@", 1)[0] not in (snap.vm, ""):
        raise InvalidArgument(f"restore point {snap.short_id} belongs to VM {snap.vm}, not {ref.split('@')[0]}")
    return snap


@cli.command("restore-disk")
@common_options
@click.argument("ref")
@click.argument("disk")
@click.argument("target", type=click.Path())
@click.option("--changed-only", is_flag=True, help="Rewrite only blocks that differ from what TARGET holds.")
@click.option("--no-verify", is_flag=True, help="Skip reading TARGET back against the stored digests.")
@click.option("--force", is_flag=True, help="Allow overwriting an existing file or a block device.")
@ticket_option
def restore_disk_cmd(ctx: Ctx, ref: str, disk: str, target: str, changed_only: bool, no_verify: bool, force: bool,
                     ticket: str | None) -> None:
    """Write DISK of restore point REF (VM@SNAPSHOT or VM@latest) to TARGET (file or block device).

    Holes stay holes in files; the result is verified against the restore point's digests.
    """
    with ctx.open_repo() as repo:
        snap = find_image_snapshot(repo, ref)
        rec = next((d for d in snap.disks if d.name == disk), None)
        if rec is None:
            raise InvalidArgument(f"restore point {snap.short_id} has no disk {disk!r} "
                                  f"(it has {', '.join(d.name for d in snap.disks)})")
        exists = os.path.exists(target)
        is_block = exists and stat.S_ISBLK(os.stat(target).st_mode)
        if exists and not (force or changed_only):
            raise InvalidArgument(f"{target} exists; pass --force to overwrite it or --changed-only to update it")
        if is_block and not changed_only and not force:
            raise InvalidArgument("refusing to write a block device without --force")
        auth = gate(ctx, snap, kind=("bare-metal", "in-place"), paths=[disk], target=target, ticket=ticket)
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        tty = sys.stderr.isatty() and not ctx.json

        def progress(done: int, total: int) -> None:
            if tty and (done % 64 == 0 or done == total):
                sys.stderr.write(f"\r\x1b[K{done}/{total} blocks ({100 * done // total}%)")

        try:
            with measured_restore(ctx.cfg, "restore-disk", snap.vm or snap.host, snap.id,
                                  str(snap.meta.get("tenant", ""))) as measure:
                stats = restore_disk(repo, rec, fd, is_block=is_block, changed_only=changed_only,
                                     verify=not no_verify, progress=progress)
                measure.done(rec.size)
        finally:
            os.close(fd)
        auth.done("ok", {"written": stats.get("written")})
        if tty:
            sys.stderr.write("\r\x1b[K")
    ctx.emit({"snapshot": snap.id, "disk": disk, "target": target, **stats},
             lambda: click.echo(f"restored disk {disk} of {snap.vm}@{snap.short_id} ({human_bytes(rec.size)}) to "
                                f"{target}: wrote {human_bytes(stats['written'])}, {stats['skipped_same']} blocks "
                                f"already right, {stats['holes']} holes, {stats['verified']} blocks verified"))
