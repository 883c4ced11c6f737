"""`ihb backup`: file-level backup of local paths."""

from __future__ import annotations

import os
import secrets

import click

from appliance.config import config_dir
from appliance.jobs import recorded_job
from repo.backup import BackupOptions, backup_paths
from repo.errors import RepositoryNotFound
from repo.repository import Repository

from . import cli
from .common import Ctx, Progress, common_options, default_host, human_bytes, tenant_option


def ensure_default_repo(ctx: Ctx) -> None:
    """The embedded default: the first backup creates the default repository with a random passphrase
    kept in a root-only file, so `ihb backup /etc` works with no set-up at all."""
    if not ctx.is_default_repo or os.path.exists(os.path.join(ctx.repo_path, "config")):
        return
    pf = ctx.cfg.default_passphrase_file
    os.makedirs(config_dir(), mode=0o700, exist_ok=True)
    if not os.path.exists(pf):
        fd = os.open(pf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    with open(pf, "rb") as f:
        pw = f.read().rstrip(b"\r\n")
    Repository.init(ctx.repo_path, pw, compression_level=ctx.cfg.compression)
    click.echo(
        f"ihb: created the default repository at {ctx.repo_path}; its passphrase is in {pf}. "
        "Keep a copy of the key: `ihb key export`.",
        err=True,
    )


@cli.command()
@common_options
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--host", default=None, help="Host name recorded in the restore point (default: this host).")
@click.option("--tag", "tags", multiple=True, help="Tag the restore point (repeatable).")
@click.option("--exclude", "excludes", multiple=True, help="Skip paths or names matching this glob (repeatable).")
@click.option("--one-file-system", "-x", is_flag=True, help="Do not cross filesystem boundaries.")
@click.option("--no-files-cache", is_flag=True, help="Read every file even if unchanged.")
@tenant_option
def backup(ctx: Ctx, paths: tuple[str, ...], host: str | None, tags: tuple[str, ...], excludes: tuple[str, ...],
           one_file_system: bool, no_files_cache: bool, tenant: str | None) -> None:
    """Back up PATHS into a new restore point.

    Exit code 0: done; 1: done, but some files could not be read (they are listed and recorded).
    """
    try:
        ensure_default_repo(ctx)
    except RepositoryNotFound:
        raise
    opts = BackupOptions(
        host=host or default_host(),
        tags=list(tags),
        excludes=list(excludes),
        one_file_system=one_file_system,
        use_files_cache=not no_files_cache,
        meta={"tenant": tenant} if tenant else {},
    )
    progress = Progress(enabled=None if not ctx.json else False)
    with recorded_job("files", opts.host, tenant=str(opts.meta.get("tenant", "")), cfg=ctx.cfg) as job, \
            ctx.open_repo() as repo:
        snap = backup_paths(repo, paths, opts, progress)
        job.finish_snapshot(snap)
    progress.done()
    s = snap.stats

    def human() -> None:
        click.echo(f"restore point {snap.short_id} of {snap.host} at {snap.time.isoformat(timespec='seconds')}")
        click.echo(
            f"  {s['files']} files, {s['dirs']} dirs, {human_bytes(s['bytes'])} in {s['duration']:.1f} s; "
            f"new data {human_bytes(s['new_bytes'])}, stored {human_bytes(s['stored_bytes'])} "
            f"({s['cached_files']} files unchanged)"
        )
        for err in snap.errors:
            click.echo(f"  skipped {err['path']}: {err['error']}", err=True)

    ctx.emit({"message_type": "summary", **snap.summary(), "skipped": snap.errors}, human)
    if snap.errors:
        raise SystemExit(1)
