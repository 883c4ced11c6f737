"""`ihb restore`: restore a file-level restore point (or parts of it) into a target directory."""

from __future__ import annotations

import sys

import click

from appliance.sla import measured_restore
from repo.errors import IntegrityError
from repo.restore import RestoreOptions, restore_snapshot

from . import cli
from .common import Ctx, Progress, common_options, human_bytes
from .ticket import gate, ticket_option


@cli.command()
@common_options
@click.argument("snapshot")
@click.argument("target", type=click.Path(file_okay=False))
@click.option("--include", "includes", multiple=True, help="Restore only this path (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace files that already exist in TARGET.")
@click.option("--numeric-owner", is_flag=True, help="Use recorded uid/gid, not user/group names.")
@ticket_option
def restore(ctx: Ctx, snapshot: str, target: str, includes: tuple[str, ...], overwrite: bool, numeric_owner: bool,
            ticket: str | None) -> None:
    """Restore SNAPSHOT (id prefix, `latest` or HOST@latest) into TARGET.

    Exit code 0: all restored; 90: some files were damaged in the repository and were not restored;
    71: the tenant requires an approved restore ticket (--ticket) and none valid was given.
    """
    progress = Progress(enabled=None if not ctx.json else False)
    with ctx.open_repo() as repo:
        snap = repo.get_snapshot(snapshot)
        with gate(ctx, snap, kind=("files", "in-place"), paths=list(includes), target=target, ticket=ticket) as auth, \
                measured_restore(ctx.cfg, "restore", snap.host, snap.id, str(snap.meta.get("tenant", ""))) as measure:
            stats, errors = restore_snapshot(
                repo, snap, target,
                RestoreOptions(overwrite=overwrite, includes=list(includes), numeric_owner=numeric_owner), progress,
            )
            measure.done(stats["bytes"], stats["files"], [f"{len(errors)} files failed"] if errors else [])
            auth.done("ok" if not errors else f"{len(errors)} files failed", {"files": stats["files"]})
    progress.done()

    def human() -> None:
        click.echo(f"restored {stats['files']} files, {stats['dirs']} dirs, {human_bytes(stats['bytes'])} "
                   f"from {snap.short_id} into {target}")
        for e in errors:
            click.echo(f"FAILED {e['path']}: {e['error']}", err=True)

    ctx.emit({"message_type": "summary", "snapshot": snap.id, **stats, "failed": errors}, human)
    if errors:
        sys.exit(IntegrityError.exit_code)
