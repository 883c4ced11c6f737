"""`ihb restore-request create|list|show|approve|deny|ticket`: restores the customer asks for and
authorizes (appliance/restore_requests.py; docs/restore.md "Authorized restores")."""

from __future__ import annotations

import click

from appliance.audit import actor_name
from appliance.restore_requests import KINDS, STATES, RestoreRequest, RestoreRequestStore, snapshot_tenant

from . import cli
from .common import Ctx, common_options
from .when import iso

AS_HELP = "Who acts (audit log; default: your login)."


def _line(r: RestoreRequest) -> str:
    paths = ",".join(r.paths) or "(all)"
    return (f"{r.id}  {r.state:8}  {r.tenant or '-':10} {r.host}@{r.snapshot[:8]}  {r.kind:10} {paths[:30]:30} "
            f"-> {r.target or '-'}  by {r.requested_by}  approvals {len(r.approvals)}/{r.required_approvals}")


def _emit_one(ctx: Ctx, r: RestoreRequest) -> None:
    def human() -> None:
        click.echo(_line(r))
        if r.ticket_secret:
            t = r.ticket or {}
            click.echo(f"approved: restore ticket (shown once, valid until {iso(t.get('expires_ns'))} UTC):")
            click.echo(f"  {r.ticket_secret}")
            click.echo("  pass it with --ticket SECRET to the restore command")
            if r.to_obj()["ticket_retrievable"]:
                click.echo(f"  the requester {r.requested_by} can also retrieve it once: "
                           f"`ihb restore-request ticket {r.id}`")
        elif r.state == "pending":
            click.echo(f"pending: {r.required_approvals - len(r.approvals)} more approval(s) needed: "
                       f"`ihb restore-request approve {r.id}`; expires {iso(r.expires_ns)} UTC")

    ctx.emit(r.to_obj(), human)


@cli.group("restore-request")
def restore_request() -> None:
    """Restores asked for and authorized per the tenant's policy; an approved request carries a ticket.

    \b
    ihb restore-request create SNAPSHOT --kind files --path /etc --target /srv/restore
    ihb restore-request list [--tenant T] [--state pending]
    ihb restore-request approve ID / deny ID --reason ...
    ihb restore-request ticket ID          the requester retrieves the ticket once
    ihb restore SNAPSHOT /srv/restore --include /etc --ticket SECRET
    """


@restore_request.command("create")
@common_options
@click.argument("snapshot")
@click.option("--kind", type=click.Choice(KINDS), default="files", show_default=True,
              help="files: to a path; in-place: over the original; instant: boot the VM; bare-metal: a whole "
                   "disk; mount: a read-only mount.")
@click.option("--path", "paths", multiple=True, metavar="PATH",
              help="Only this path (repeatable; DISK:/path or DISK for VM images); default: everything.")
@click.option("--target", default="", help="Where the data goes: a directory, file, device or mountpoint.")
@click.option("--target-host", default="", help="The host the data goes to (file restores back to the source host "
                                                 "may be approved automatically).")
@click.option("--reason", default="", help="Why (shown to the authorizers, kept in the audit log).")
@click.option("--as", "as_", default=None, help=AS_HELP)
def create_cmd(ctx: Ctx, snapshot: str, kind: str, paths: tuple[str, ...], target: str, target_host: str,
               reason: str, as_: str | None) -> None:
    """Ask for a restore of SNAPSHOT (id prefix, `latest` or HOST@latest)."""
    with ctx.open_repo() as repo:
        snap = repo.get_snapshot(snapshot)
    store = RestoreRequestStore.for_config(ctx.cfg)
    r = store.create(tenant=snapshot_tenant(ctx.cfg, snap), host=snap.host, snapshot=snap.id, kind=kind,
                     paths=list(paths), target=target, requested_by=actor_name(as_), reason=reason,
                     target_host=target_host)
    _emit_one(ctx, r)


@restore_request.command("list")
@common_options
@click.option("--tenant", default=None, help="Only this tenant's requests.")
@click.option("--state", type=click.Choice(STATES), default=None, help="Only requests in this state.")
def list_cmd(ctx: Ctx, tenant: str | None, state: str | None) -> None:
    """List restore requests (oldest first)."""
    reqs = RestoreRequestStore.for_config(ctx.cfg).list(tenant=tenant, state=state)

    def human() -> None:
        for r in reqs:
            click.echo(_line(r))
        if not reqs:
            click.echo("no restore requests")

    ctx.emit([r.to_obj() for r in reqs], human)


@restore_request.command("show")
@common_options
@click.argument("request_id")
def show_cmd(ctx: Ctx, request_id: str) -> None:
    """One restore request with its history."""
    r = RestoreRequestStore.for_config(ctx.cfg).get(request_id)

    def human() -> None:
        click.echo(_line(r))
        if r.reason:
            click.echo(f"  reason: {r.reason}")
        for h in r.history:
            click.echo(f"  {iso(h.get('time_ns'))}  {h.get('event'):9} {h.get('by')}  {h.get('reason', '')}")
        if r.ticket:
            click.echo(f"  ticket valid until {iso(r.ticket['expires_ns'])} UTC, "
                       f"{'single use' if r.ticket['single_use'] else 'reusable until then'}")

    ctx.emit(r.to_obj(), human)


@restore_request.command("approve")
@common_options
@click.argument("request_id")
@click.option("--as", "as_", default=None, help=AS_HELP)
def approve_cmd(ctx: Ctx, request_id: str, as_: str | None) -> None:
    """Approve a pending request; the approval that completes it prints the ticket (once).

    Exit code 72 if you may not approve it (your own request, twice, not an authorizer, not pending).
    """
    _emit_one(ctx, RestoreRequestStore.for_config(ctx.cfg).approve(request_id, actor_name(as_)))


@restore_request.command("deny")
@common_options
@click.argument("request_id")
@click.option("--reason", default="", help="Why (kept in the audit log).")
@click.option("--as", "as_", default=None, help=AS_HELP)
def deny_cmd(ctx: Ctx, request_id: str, reason: str, as_: str | None) -> None:
    """Deny a request (an authorizer), or withdraw your own; its ticket, if any, stops working."""
    _emit_one(ctx, RestoreRequestStore.for_config(ctx.cfg).deny(request_id, actor_name(as_), reason))


@restore_request.command("ticket")
@common_options
@click.argument("request_id")
@click.option("--as", "as_", default=None, help=AS_HELP)
def ticket_cmd(ctx: Ctx, request_id: str, as_: str | None) -> None:
    """The requester retrieves the ticket of an approved request, once."""
    secret = RestoreRequestStore.for_config(ctx.cfg).claim_ticket(request_id, actor_name(as_))
    ctx.emit({"request": request_id, "ticket": secret}, lambda: click.echo(secret))
