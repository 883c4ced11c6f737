"""`ihb audit` (list the audit log) and `ihb audit verify` (prove nothing was edited, removed or reordered)."""

from __future__ import annotations

import click

from appliance.audit import AuditLog, AuditTampered
from appliance.config import load_config

from . import cli
from .when import iso, ns, parse_when


@cli.group("audit", invoke_without_command=True)
@click.option("--since", default=None, help="Only entries since DATE (2026-11-01, or 7d).")
@click.option("--action", default=None, help="Only this action (prune, lock, approve-unlock, ...).")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable JSON output.")
@click.option("--config", "config", type=click.Path(dir_okay=False), help="Config file (TOML).")
@click.pass_context
def audit(cctx: click.Context, since: str | None, action: str | None, json_out: bool, config: str | None) -> None:
    """The append-only audit log: requests, approvals, refusals, locks, prunes, GC."""
    cctx.obj = load_config(config)
    if cctx.invoked_subcommand is not None:
        return
    log = AuditLog.for_config(cctx.obj)
    since_ns = ns(parse_when(since)) if since else None
    entries = [e for e in log.entries() if (since_ns is None or e.get("time_ns", 0) >= since_ns)
               and (action is None or e.get("action") == action)]
    if json_out:
        import json

        click.echo(json.dumps(entries, indent=1))
        return
    for e in entries:
        click.echo(f"{e.get('seq', '?'):>5}  {iso(e.get('time_ns'))}  {e.get('actor', '?'):12} {e.get('action', '?'):16} "
                   f"{str(e.get('target', ''))[:24]:24} {e.get('details', '')}")
    if not entries:
        click.echo("the audit log is empty", err=True)


@audit.command("verify")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable JSON output.")
@click.pass_obj
def audit_verify(cfg: object, json_out: bool) -> None:
    """Check the hash chain. Exit 0 if intact, 63 if anything was edited, deleted, reordered or cut off."""
    res = AuditLog.for_config(cfg).verify()  # type: ignore[arg-type]
    if json_out:
        import json

        click.echo(json.dumps({"ok": res.ok, "entries": res.entries, "problems": res.problems}))
    else:
        for p in res.problems:
            click.echo(f"problem: {p}")
        click.echo(f"{res.entries} entries, " + ("chain intact" if res.ok else "TAMPERING DETECTED"))
    if not res.ok:
        raise SystemExit(AuditTampered.exit_code)
