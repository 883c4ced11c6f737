"""`ihb token create|list|revoke`: the appliance's API tokens (stored hashed in the server state)."""

from __future__ import annotations

import datetime as dt
import json
import os

import click

from appliance.config import load_config
from appliance.server.settings import load_settings
from appliance.server.state import ROLES, State

from . import cli


def _state(config: str | None, state_dir: str | None) -> State:
    cfg = load_config(config)
    settings = load_settings(cfg.server, cfg.path or "config")
    return State(state_dir or settings.state_dir)


def _opts(fn):  # type: ignore[no-untyped-def]
    fn = click.option("--config", type=click.Path(dir_okay=False), help="Config file (TOML).")(fn)
    fn = click.option("--state-dir", type=click.Path(file_okay=False), help="Server state directory.")(fn)
    return click.option("--json", "json_out", is_flag=True, help="Machine-readable JSON output.")(fn)


@cli.group()
def token() -> None:
    """API tokens: agents (one host of a tenant), tenants (all their hosts) and admins."""


@token.command("create")
@_opts
@click.option("--tenant", default=None, help="Tenant the token belongs to (not for admin tokens).")
@click.option("--host", default=None, help="Host an agent token backs up (required for --role agent).")
@click.option("--role", type=click.Choice(ROLES), default="agent", show_default=True)
@click.option("--own-key", is_flag=True,
              help="New tenant only: encrypt its content with its own key (no deduplication with other tenants).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write the token to this file (mode 0600).")
@click.option("--note", default="", help="Free text shown in `ihb token list`.")
def token_create(config: str | None, state_dir: str | None, json_out: bool, tenant: str | None, host: str | None,
                 role: str, own_key: bool, output: str | None, note: str) -> None:
    """Create a token; it is shown once (only its hash is kept)."""
    if role != "admin" and not tenant:
        raise click.UsageError("--tenant is required for agent and tenant tokens")
    if role == "agent" and not host:
        raise click.UsageError("--host is required for agent tokens")
    st = _state(config, state_dir)
    try:
        tok, rec = st.create_token(role, tenant or "*", host or "*", own_key=own_key, note=note)
    finally:
        st.close()
    if output:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(tok + "\n")
    if json_out:
        click.echo(json.dumps({"token": None if output else tok, "id": rec.id, "role": rec.role,
                               "tenant": rec.tenant, "host": rec.host, "file": output}))
    else:
        if not output:
            click.echo(tok)
        click.echo(f"token {rec.id}: role {rec.role}, tenant {rec.tenant}, host {rec.host}"
                   + (f", written to {output}" if output else "; it is not shown again"), err=True)


@token.command("list")
@_opts
def token_list(config: str | None, state_dir: str | None, json_out: bool) -> None:
    """List tokens (ids, bindings and state; never the tokens themselves)."""
    st = _state(config, state_dir)
    try:
        recs = st.tokens()
        tenants = st.tenants()
    finally:
        st.close()
    if json_out:
        click.echo(json.dumps([{**r.__dict__, "own_key": bool(tenants.get(r.tenant, {}).get("own_key"))}
                               for r in recs], indent=1))
        return
    click.echo(f"{'ID':16}  {'ROLE':6}  {'TENANT':16}  {'HOST':20}  {'CREATED (UTC)':19}  STATE")
    for r in recs:
        created = dt.datetime.fromtimestamp(r.created, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        extra = " own-key" if tenants.get(r.tenant, {}).get("own_key") else ""
        click.echo(f"{r.id:16}  {r.role:6}  {r.tenant:16}  {r.host:20}  {created:19}  "
                   f"{'revoked' if r.revoked else 'active'}{extra}{'  ' + r.note if r.note else ''}")


@token.command("revoke")
@_opts
@click.argument("token_id")
def token_revoke(config: str | None, state_dir: str | None, json_out: bool, token_id: str) -> None:
    """Revoke a token by its id (or a unique prefix); effective at once, even on a running server."""
    st = _state(config, state_dir)
    try:
        rec = st.revoke_token(token_id)
    finally:
        st.close()
    if json_out:
        click.echo(json.dumps({"revoked": rec.id}))
    else:
        click.echo(f"revoked token {rec.id} ({rec.role}, tenant {rec.tenant}, host {rec.host})")
