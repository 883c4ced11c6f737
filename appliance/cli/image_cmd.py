"""`ihb backup-image`: back up an offline disk image or block device as an image restore point."""

from __future__ import annotations

import time

import click

from appliance.hypervisor.image_backup import backup_disk
from appliance.hypervisor.sources import open_source
from appliance.jobs import recorded_job
from repo.image_catalog import index_image_snapshot_quietly
from repo.snapshot import Snapshot
from repo.workers import Pipeline

from . import cli
from .common import Ctx, Progress, common_options, default_host, human_bytes, tenant_option


@cli.command("backup-image")
@common_options
@click.option("--vm", required=True, help="VM name recorded in the restore point.")
@click.option("--disk", "disk_name", required=True, help="Disk name (e.g. vda).")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--tag", "tags", multiple=True, help="Tag the restore point (repeatable).")
@tenant_option
def backup_image(ctx: Ctx, vm: str, disk_name: str, source: str, tags: tuple[str, ...], tenant: str | None) -> None:
    """Back up SOURCE (raw image, block device or qcow2) as disk DISK of VM.

    Holes, zero blocks and unallocated qcow2 clusters are recorded as holes: not read, not stored.
    """
    progress = Progress(enabled=None if not ctx.json else False)
    start = time.time_ns()
    src = open_source(source)
    try:
        with recorded_job("image", vm, tenant=tenant or "", cfg=ctx.cfg) as job, ctx.open_repo() as repo:
            writer = repo.writer()
            with Pipeline() as pipe:
                try:
                    rec = backup_disk(repo, writer, pipe, src, disk_name, progress=progress)
                    pipe.drain()
                    writer.flush()
                except BaseException:
                    writer.abort()
                    raise
            prev = [s for s in repo.snapshots() if s.kind == "image" and s.vm == vm]
            snap = repo.store_snapshot(Snapshot(
                id="", kind="image", host=default_host(), time_ns=start, tags=list(tags), disks=[rec],
                stats={**writer.stats, "bytes": rec.size, "read_bytes": rec.stats["read_bytes"],
                       "duration": round((time.time_ns() - start) / 1e9, 3)},
                meta={"vm": vm, "consistency": "offline", "source": source, **({"tenant": tenant} if tenant else {})},
                parent=prev[-1].id if prev else None,
            ))
            job.finish_snapshot(snap)
            index_image_snapshot_quietly(repo, snap)
    finally:
        src.close()
    progress.done()
    st = rec.stats

    def human() -> None:
        click.echo(f"restore point {snap.short_id}: VM {vm} disk {disk_name} ({human_bytes(rec.size)}), "
                   f"read {human_bytes(st['read_bytes'])}, holes/zeros {human_bytes(st['zero_bytes'])}, "
                   f"new {human_bytes(writer.stats['new_bytes'])} in {st['seconds']:.1f} s")

    ctx.emit({"message_type": "summary", **snap.summary(), "disk_stats": st}, human)
