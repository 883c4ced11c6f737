"""`ihb sync`: copy restore points between repositories (appliance to appliance, or to/from a bucket).

Run it on the target for a pull (the target holds the only credentials that can delete its copies), or
on the source for a push; the code is the same and never writes to the source (repo/sync.py).
"""

from __future__ import annotations

import getpass
import os
import sys

import click

from repo import storage_s3
from repo.errors import PassphraseRequired
from repo.repository import Repository, default_cache_root
from repo.retention import Duration, Policy
from repo.sync import default_map_path, sync

from . import cli
from .common import Ctx, Progress, human_bytes, read_passphrase_file


def _read_pass(file: str | None, env_var: str, env_file: str, fallback: Ctx, label: str) -> bytes | None:
    pf = file or os.environ.get(env_file)
    if pf:
        return read_passphrase_file(pf)
    if os.environ.get(env_var) is not None:
        return os.environ[env_var].encode()
    try:
        return fallback.passphrase()
    except PassphraseRequired:
        if sys.stdin.isatty():
            return getpass.getpass(f"Passphrase for the {label} repository: ").encode()
        raise


@cli.command("sync")
@click.option("--from", "src", required=True, help="Source repository (path or s3://...); only read, never written.")
@click.option("--to", "dst", default=None, help="Target repository (default: --repo / $IHB_REPO / the config's).")
@click.option("--repo", "-r", envvar="IHB_REPO", default=None, hidden=True)
@click.option("--host", "hosts", multiple=True, help="Only restore points of this host or VM (repeatable).")
@click.option("--tag", "tags", multiple=True, help="Only restore points with this tag (repeatable).")
@click.option("--keep-last", type=click.IntRange(0), default=0, help="Target retention: keep the N newest copies.")
@click.option("--keep-hourly", type=click.IntRange(0), default=0, help="... and the newest of each of N hours.")
@click.option("--keep-daily", type=click.IntRange(0), default=0, help="... of each of N days.")
@click.option("--keep-weekly", type=click.IntRange(0), default=0, help="... of each of N ISO weeks.")
@click.option("--keep-monthly", type=click.IntRange(0), default=0, help="... of each of N months.")
@click.option("--keep-yearly", type=click.IntRange(0), default=0, help="... of each of N years.")
@click.option("--keep-within", default=None, metavar="DURATION",
              help="... and all within DURATION (e.g. 2w, 1m3d) of the newest copy.")
@click.option("--verify", type=click.Choice(["data", "index"]), default="data", show_default=True,
              help="On arrival: read back and authenticate every new pack (data), or check pack trailers only.")
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be copied and removed; change nothing.")
@click.option("--from-passphrase-file", type=click.Path(dir_okay=False),
              help="Source passphrase (default: $IHB_FROM_PASSPHRASE(_FILE), else the target's).")
@click.option("--passphrase-file", type=click.Path(dir_okay=False), help="Target passphrase file.")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable JSON output.")
@click.option("--config", "config", type=click.Path(dir_okay=False), help="Config file (TOML).")
def sync_cmd(src: str, dst: str | None, repo: str | None, hosts: tuple[str, ...], tags: tuple[str, ...],
             keep_last: int, keep_hourly: int, keep_daily: int, keep_weekly: int, keep_monthly: int,
             keep_yearly: int, keep_within: str | None, verify: str, dry_run: bool, from_passphrase_file: str | None,
             passphrase_file: str | None, json_out: bool, config: str | None) -> None:
    """Copy restore points from --from to --to: only missing chunks travel, verified on arrival, resumable.

    Deletions at the source are never mirrored; --keep-* is the target's own retention over the copies
    that came from this source.
    """
    ctx = Ctx(dst or repo, passphrase_file, json_out, config)
    storage_s3.configure(ctx.cfg.raw.get("s3") or None)  # credentials/tuning for s3:// locations (repo/ reads no config)
    policy = Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly,
                    within=Duration.parse(keep_within) if keep_within else None)
    cache = ctx.cfg.cache_dir or default_cache_root()
    src_pw = _read_pass(from_passphrase_file, "IHB_FROM_PASSPHRASE", "IHB_FROM_PASSPHRASE_FILE", ctx, "source")
    progress = Progress()
    with Repository.open(src, lambda: src_pw, lock=False, cache_dir=cache) as source, \
            ctx.open_repo(exclusive=not policy.empty() and not dry_run) as target:
        report = sync(source, target, hosts=hosts, tags=tags, policy=policy, verify=verify, dry_run=dry_run,
                      map_path=default_map_path(target, source),
                      progress=(lambda m: progress({"files": 0, "bytes": 0}, m)) if progress.enabled else None)
    progress.done()

    def human() -> None:
        verb = "would copy" if dry_run else "copied"
        for c in report.copied:
            click.echo(f"{verb} {c['source'][:8]}" + (f" -> {c['target'][:8]}" if c["target"] else ""))
        for r in report.refused:
            click.echo(f"refused {r['source'][:8]}: {r['reason']}")
        for sid in report.removed:
            click.echo(f"{'would remove' if dry_run else 'removed'} {sid[:8]} from the target (retention)")
        s = report.stats
        click.echo(f"{len(report.copied)} restore points {verb}, {len(report.already)} already present, "
                   f"{len(report.not_copied_by_policy)} outside the target's retention; "
                   f"read {s['chunks_read']} chunks ({human_bytes(s['bytes_read'])}), wrote {s['chunks_written']} "
                   f"({human_bytes(s['stored_bytes'])} stored), verified {s['packs_verified']} packs")

    ctx.emit({"message_type": "sync", **report.to_obj()}, human)
