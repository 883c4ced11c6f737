"""`ihb agent backup|snapshots|restore`: this host as a network agent of an appliance."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from repo.errors import IntegrityError, InvalidArgument

from . import cli
from .common import Progress, human_bytes

if TYPE_CHECKING:
    from appliance.agent.client import Client
    from appliance.agent.config import AgentConfig

# The agent modules are imported inside the commands: every `ihb` invocation imports this module.

F = TypeVar("F", bound=Callable[..., Any])


class _DashDashCommand(click.Command):
    """Keeps what follows ``--`` apart from PATHS: it is the dump command of --stdin-name."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            i = args.index("--")
            ctx.meta["ihb_stream_cmd"] = args[i + 1 :]
            args = args[:i]
        return super().parse_args(ctx, args)


def connection_options(fn: F) -> F:
    @click.option("--server", help="Appliance URL, https://HOST:PORT/ (or `server` in the agent config).")
    @click.option("--token-file", type=click.Path(dir_okay=False), help="File holding this host's token.")
    @click.option("--fingerprint", help="Pin the appliance certificate's SHA-256 fingerprint (printed by `ihb serve`).")
    @click.option("--ca-file", type=click.Path(dir_okay=False), help="Trust the appliance certificate through this CA.")
    @click.option("--agent-config", type=click.Path(dir_okay=False), help="Agent config file (TOML).")
    @click.option("--retry-for", type=float, default=None, help="Keep retrying an unreachable appliance this many seconds (default 300).")
    @click.option("--json", "json_out", is_flag=True, help="Machine-readable JSON output.")
    @functools.wraps(fn)
    def wrapper(server: str | None, token_file: str | None, fingerprint: str | None, ca_file: str | None,
                agent_config: str | None, retry_for: float | None, json_out: bool, **kw: Any) -> Any:
        from appliance.agent.config import load_agent_config

        cfg = load_agent_config(agent_config)
        return fn(_Conn(cfg, server, token_file, fingerprint, ca_file, retry_for, json_out), **kw)

    return wrapper  # type: ignore[return-value]


class _Conn:
    def __init__(self, cfg: AgentConfig, server: str | None, token_file: str | None, fingerprint: str | None,
                 ca_file: str | None, retry_for: float | None, json_out: bool) -> None:
        self.cfg = cfg
        self.server = server or cfg.server
        self.token_file = token_file or cfg.token_file
        if fingerprint or ca_file:  # the command line overrides the config's trust setting as a whole
            self.fingerprint, self.ca_file = fingerprint, ca_file
        else:
            self.fingerprint, self.ca_file = cfg.fingerprint, cfg.ca_file
        self.retry_for = retry_for if retry_for is not None else cfg.retry_for
        self.json = json_out

    def client(self, bwlimit: str | None = None) -> Client:
        from appliance.agent.client import Client, parse_rate
        from appliance.agent.config import read_token

        if not self.server:
            raise InvalidArgument("give --server URL (or `server` in the agent config)")
        if not self.token_file:
            raise InvalidArgument("give --token-file FILE (or `token_file` in the agent config)")
        rate = bwlimit or self.cfg.bwlimit
        return Client(self.server, read_token(self.token_file), fingerprint=self.fingerprint, ca_file=self.ca_file,
                      retry_for=self.retry_for, bwlimit=parse_rate(rate) if rate else None)

    def emit(self, obj: Any, human: Callable[[], None]) -> None:
        import json

        if self.json:
            click.echo(json.dumps(obj, indent=1, default=str))
        else:
            human()


@cli.group()
def agent() -> None:
    """Back up this host to an appliance, and restore from it (this host's restore points only)."""


@agent.command("backup", cls=_DashDashCommand)
@connection_options
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--tag", "tags", multiple=True, help="Tag the restore point (repeatable).")
@click.option("--exclude", "excludes", multiple=True, help="Skip paths or names matching this glob (repeatable).")
@click.option("--one-file-system", "-x", is_flag=True, help="Do not cross filesystem boundaries.")
@click.option("--no-files-cache", is_flag=True, help="Read every file even if unchanged.")
@click.option("--pre-hook", help="Shell command run before the backup; if it fails nothing is backed up.")
@click.option("--post-hook", help="Shell command run after the backup, whatever happened (IHB_BACKUP_STATUS=ok|failed).")
@click.option("--stdin-name", help="Store the output of the command after `--` as the file NAME (e.g. db.sql).")
@click.option("--bwlimit", help="Upload bandwidth limit in bytes per second (K, M, G suffixes).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Files cache and resume state (default: $IHB_CACHE_DIR).")
def agent_backup(conn: _Conn, paths: tuple[str, ...], tags: tuple[str, ...], excludes: tuple[str, ...],
                 one_file_system: bool, no_files_cache: bool, pre_hook: str | None, post_hook: str | None,
                 stdin_name: str | None, bwlimit: str | None, cache_dir: str | None) -> None:
    """Back up PATHS (and/or a dump stream) of this host to the appliance.

    \b
    ihb agent backup --server https://appliance:8443/ --token-file /etc/ihb/agent.token \\
        --fingerprint sha256:... /etc /srv
    ihb agent backup ... --stdin-name db.sql -- pg_dump mydb

    Only chunks the appliance lacks are sent; an interrupted upload resumes. Exit 0: done; 1: done,
    but some files could not be read or the post-hook failed; 69: the pre-hook failed;
    70: the dump command failed (see docs/protocol.md §9).
    """
    from appliance.agent.backup import AgentJob, Stream, run_backup, with_hooks
    from repo.repository import default_cache_root

    command = click.get_current_context().meta.get("ihb_stream_cmd") or []
    if stdin_name and not command:
        raise click.UsageError("--stdin-name NAME needs the dump command after `--`")
    if command and not stdin_name:
        raise click.UsageError("a command after `--` needs --stdin-name NAME")
    all_paths = list(paths) or list(conn.cfg.paths if not stdin_name else [])
    job = AgentJob(paths=all_paths, streams=[Stream(stdin_name, command)] if stdin_name else [],
                   tags=list(tags), excludes=list(excludes) + conn.cfg.exclude, one_file_system=one_file_system,
                   use_files_cache=not no_files_cache,
                   cache_dir=cache_dir or conn.cfg.cache_dir or default_cache_root())
    client = conn.client(bwlimit)
    progress = Progress(enabled=None if not conn.json else False)
    try:
        (snap, info), post_rc = with_hooks(pre_hook or conn.cfg.pre_hook, post_hook or conn.cfg.post_hook,
                                           lambda: run_backup(client, job, progress))
    finally:
        progress.done()
        client.close()
    s = snap.stats

    def human() -> None:
        click.echo(f"restore point {snap.short_id} of {info['host']} (tenant {info['tenant']}) stored on {conn.server}")
        click.echo(f"  {s.get('files', 0)} files, {s.get('dirs', 0)} dirs, {human_bytes(s.get('bytes', 0))} "
                   f"in {s.get('duration', 0):.1f} s; sent {human_bytes(s.get('sent_bytes', 0))} "
                   f"({s.get('sent_chunks', 0)} blobs), {s.get('cached_files', 0)} files unchanged"
                   + (" (resumed)" if info.get("resumed") else ""))
        for err in snap.errors:
            click.echo(f"  skipped {err['path']}: {err['error']}", err=True)

    conn.emit({"message_type": "summary", "id": snap.id, "host": info["host"], "tenant": info["tenant"],
               "session": info.get("session"), "resumed": info.get("resumed"), "stats": s,
               "skipped": snap.errors, "post_hook_status": post_rc}, human)
    if snap.errors or post_rc:
        sys.exit(1)


@agent.command("snapshots")
@connection_options
def agent_snapshots(conn: _Conn) -> None:
    """List this host's restore points on the appliance."""
    from appliance.agent.restore import list_snapshots

    client = conn.client()
    try:
        snaps = list_snapshots(client)
    finally:
        client.close()

    def human() -> None:
        click.echo(f"{'ID':8}  {'TIME (UTC)':20}  {'HOST':20}  {'SIZE':>10}  PATHS")
        for s in snaps:
            click.echo(f"{s['short_id']:8}  {s['time'][:19].replace('T', ' '):20}  {s['host']:20}  "
                       f"{human_bytes(s.get('stats', {}).get('bytes', 0)):>10}  {', '.join(s.get('paths', []))}")
        click.echo(f"{len(snaps)} restore points")

    conn.emit(snaps, human)


@agent.command("restore")
@connection_options
@click.argument("snapshot")
@click.argument("target", type=click.Path(file_okay=False))
@click.option("--include", "includes", multiple=True, help="Restore only this path (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace files that already exist in TARGET.")
@click.option("--numeric-owner", is_flag=True, help="Use recorded uid/gid, not user/group names.")
@click.option("--ticket", default=None, envvar="IHB_RESTORE_TICKET", metavar="SECRET",
              help="Approved files ticket (`ihb restore-request`), needed when the tenant requires authorized "
                   "restores (or $IHB_RESTORE_TICKET).")
def agent_restore(conn: _Conn, snapshot: str, target: str, includes: tuple[str, ...], overwrite: bool,
                  numeric_owner: bool, ticket: str | None) -> None:
    """Restore SNAPSHOT (id prefix or `latest`) of this host from the appliance into TARGET.

    Exit 0: all restored; 90: some files could not be restored (listed); 71: the tenant requires an
    authorized restore and no valid ticket was given.
    """
    from appliance.agent.restore import restore as remote_restore
    from repo.restore import RestoreOptions

    client = conn.client()
    progress = Progress(enabled=None if not conn.json else False)
    try:
        snap, stats, errors = remote_restore(
            client, snapshot, target,
            RestoreOptions(overwrite=overwrite, includes=list(includes), numeric_owner=numeric_owner), progress,
            ticket=ticket)
    finally:
        progress.done()
        client.close()

    def human() -> None:
        click.echo(f"restored {stats['files']} files, {stats['dirs']} dirs, {human_bytes(stats['bytes'])} "
                   f"from {snap.short_id} into {os.path.abspath(target)}")
        for e in errors:
            click.echo(f"FAILED {e['path']}: {e['error']}", err=True)

    conn.emit({"message_type": "summary", "snapshot": snap.id, **stats, "failed": errors}, human)
    if errors:
        sys.exit(IntegrityError.exit_code)

