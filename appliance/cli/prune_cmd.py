"""Retention and space: `prune`, `gc`, retention locks (`lock`, `locks`, `unlock`), two-person approvals
(`approve`, `approvals`) and `delete-tenant`."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from appliance.approvals import ApprovalStore, Request
from appliance.audit import AuditLog, actor_name
from appliance.config import Config
from repo import gc as gcmod
from repo import retention_lock as rl
from repo.errors import InvalidArgument
from repo.prune import Rule, plan_prune, plan_prune_rules, plan_tenant_deletion, select
from repo.repository import Repository
from repo.retention import DEFAULT_GROUP_BY, DEFAULT_POLICY, GROUP_FIELDS, Duration, Policy

from . import cli
from .common import Ctx, common_options, human_bytes
from .when import iso, ns, parse_when


def _seconds(text: str) -> float:
    """``3600``, ``90s``, ``30min``, ``6h``, ``2d``."""
    t = text.strip().lower()
    try:
        if t.endswith("min"):
            return float(t[:-3]) * 60
        if t.endswith("s"):
            return float(t[:-1])
        return float(t)
    except ValueError:
        pass
    d = Duration.parse(t)
    now = time.time()
    import datetime as dt

    ref = dt.datetime.fromtimestamp(now, tz=dt.UTC)
    return (ref - d.before(ref)).total_seconds()


def config_rules(cfg: Config) -> tuple[list[Rule], Policy]:
    """``[retention]`` keep_* keys (the default) and ``[[retention.rules]]`` with tenant/host/vm selectors."""
    sec = cfg.raw.get("retention", {}) or {}

    def pol(o: dict[str, Any]) -> Policy:
        return Policy.from_obj({k.removeprefix("keep_"): v for k, v in o.items() if k.startswith("keep_")})

    default = pol(sec) if any(k.startswith("keep_") for k in sec) else DEFAULT_POLICY
    rules = [Rule(pol(r), r.get("tenant"), r.get("host"), r.get("vm")) for r in sec.get("rules", [])]
    return rules, default


@cli.command()
@common_options
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be deleted and why; delete nothing.")
@click.option("--keep-last", type=int, default=0, help="Keep the N newest restore points (-1: all).")
@click.option("--keep-hourly", type=int, default=0, help="Keep the newest of each of the last N hours.")
@click.option("--keep-daily", type=int, default=0, help="Keep the newest of each of the last N days.")
@click.option("--keep-weekly", type=int, default=0, help="Keep the newest of each of the last N ISO weeks.")
@click.option("--keep-monthly", type=int, default=0, help="Keep the newest of each of the last N months.")
@click.option("--keep-yearly", type=int, default=0, help="Keep the newest of each of the last N years.")
@click.option("--keep-within", default=None, help="Keep all within this of the newest (7d, 2w, 6m, 1y).")
@click.option("--host", default=None, help="Only this host's (or VM's) restore points.")
@click.option("--tenant", default=None, help="Only this tenant's restore points.")
@click.option("--vm", default=None, help="Only this VM's restore points.")
@click.option("--group-by", default=",".join(DEFAULT_GROUP_BY), show_default=True,
              help=f"Judge restore points per group of these fields ({', '.join(GROUP_FIELDS)}).")
@click.option("--gc", "run_gc", is_flag=True, help="Run `ihb gc` afterwards to free the space.")
@click.option("--as", "as_", default=None, help="Who runs this (audit log; default: your login).")
def prune(ctx: Ctx, dry_run: bool, keep_last: int, keep_hourly: int, keep_daily: int, keep_weekly: int,
          keep_monthly: int, keep_yearly: int, keep_within: str | None, host: str | None, tenant: str | None,
          vm: str | None, group_by: str, run_gc: bool, as_: str | None) -> None:
    """Delete restore points the retention policy no longer keeps (locked ones are always kept).

    Without --keep-* options the policy comes from the config ([retention]); with none there either,
    the default keeps 1 last, 14 daily, 8 weekly and 6 monthly. Space is freed by `ihb gc`.
    """
    fields = tuple(f.strip() for f in group_by.split(",") if f.strip())
    policy = Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly,
                    Duration.parse(keep_within) if keep_within else None)
    with ctx.open_repo() as repo:
        if not policy.empty():
            plan = plan_prune(repo, policy, host=host, tenant=tenant, vm=vm, group_by=fields)
        else:
            rules, default = config_rules(ctx.cfg)
            plan = plan_prune_rules(repo, rules, default, group_by=fields)
            if host or tenant or vm:
                chosen = {s.id for s in select(plan.remove, host, tenant, vm)}
                plan.keep += [s for s in plan.remove if s.id not in chosen]
                plan.remove = [s for s in plan.remove if s.id in chosen]
        report = None if dry_run else plan.execute()
        gc_report = None
        if report is not None:
            AuditLog.for_config(ctx.cfg).append(actor_name(as_), "prune", host or tenant or vm or "*",
                                                {"deleted": report.deleted, "skipped_locked": report.skipped_locked,
                                                 "policy": plan.policy.to_obj() if plan.policy else "config rules"})
            if run_gc:
                gc_report = gcmod.run_gc(repo, grace=gcmod.DEFAULT_GRACE)
    rows = plan.rows()

    def human() -> None:
        for r in rows:
            why = ", ".join(r["reasons"]) if r["reasons"] else ""
            click.echo(f"{r['action']:6}  {r['short_id']}  {r['time'][:19].replace('T', ' ')}  {r['host'] or '':20}  {why}")
        verb = "would delete" if dry_run else "deleted"
        n = len(plan.remove) if dry_run or report is None else len(report.deleted)
        click.echo(f"{verb} {n} of {len(rows)} restore points; keeping {len(plan.keep)}"
                   + (f" ({plan.policy.describe()})" if plan.policy else " (config rules)"))
        if report and report.skipped_locked:
            click.echo(f"kept {len(report.skipped_locked)} restore points locked after planning", err=True)
        if gc_report:
            click.echo(f"gc: {gc_report.phase}, freed {human_bytes(gc_report.freed_bytes)}")
        elif not dry_run:
            click.echo("space is freed by `ihb gc`")

    ctx.emit({**plan.to_obj(), "dry_run": dry_run, "report": report.to_obj() if report else None,
              "gc": gc_report.to_obj() if gc_report else None}, human)


@cli.command()
@common_options
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be condemned and freed; change nothing.")
@click.option("--grace", default="6h", show_default=True,
              help="Never touch packs younger than this (seconds, 30min, 6h, 2d).")
@click.option("--wait", "wait", default="0", show_default=True,
              help="Wait up to this long for backups that started before the mark (otherwise the next run sweeps).")
@click.option("--min-live-ratio", type=click.FloatRange(0, 1), default=gcmod.DEFAULT_MIN_LIVE_RATIO,
              show_default=True, help="Compact packs whose live share is below this.")
@click.option("--abort", is_flag=True, help="Abandon a pending condemnation (re-index its blobs).")
@click.option("--status", is_flag=True, help="Show the pending condemnation and the registered backup sessions.")
@click.option("--as", "as_", default=None, help="Who runs this (audit log; default: your login).")
def gc(ctx: Ctx, dry_run: bool, grace: str, wait: str, min_live_ratio: float, abort: bool, status: bool,
       as_: str | None) -> None:
    """Delete unreferenced data and compact packs, safely beside running backups; report space freed.

    A blob a running backup may still reference is never deleted: the sweep waits until every backup
    that started before the blobs were condemned has finished (docs/format.md §9).
    """
    with ctx.open_repo() as repo:
        if status:
            st = gcmod.status(repo)
            ctx.emit(st, lambda: _print_status(st))
            return
        if abort:
            with gcmod.maintenance_lock(repo):
                n = gcmod.abort_pending(repo)
            ctx.emit({"aborted": True, "reindexed": n}, lambda: click.echo(f"pending GC aborted; {n} blobs re-indexed"))
            return
        if dry_run:
            est = gcmod.plan_gc(repo, _seconds(grace), min_live_ratio).estimate()
            ctx.emit(est.to_obj(), lambda: _print_gc(est))
            return
        rep = gcmod.run_gc(repo, grace=_seconds(grace), min_live_ratio=min_live_ratio, wait=_seconds(wait),
                           progress=_progress(ctx))
        AuditLog.for_config(ctx.cfg).append(actor_name(as_), "gc", repo.config.repo_id,
                                            {k: v for k, v in rep.to_obj().items() if k != "blocking"})
    ctx.emit(rep.to_obj(), lambda: _print_gc(rep))


def _progress(ctx: Ctx) -> Any:
    if ctx.json or not sys.stderr.isatty():
        return None
    return lambda msg: click.echo(f"\r\x1b[K{msg}", nl=False, err=True)


def _print_gc(r: gcmod.GcReport) -> None:
    if r.dry_run:
        click.echo(f"would condemn {r.condemned_blobs} unreferenced blobs ({human_bytes(r.condemned_bytes)}), "
                   f"delete {r.deleted_packs} packs, compact {r.compacted_packs}; "
                   f"would free about {human_bytes(r.freed_bytes)} of {human_bytes(r.bytes_before)}")
        for b in r.blocking:
            click.echo(f"  running backup: {b} (the sweep waits for it)")
        return
    click.echo(f"condemned {r.condemned_blobs} blobs ({human_bytes(r.condemned_bytes)}), rescued {r.rescued_blobs}; "
               f"deleted {r.deleted_packs} packs, compacted {r.compacted_packs} into {r.new_packs} "
               f"({human_bytes(r.copied_bytes)} copied)")
    if r.phase == "deferred":
        click.echo("deletion deferred: these backups started before the mark and are still running:")
        for b in r.blocking:
            click.echo(f"  {b}")
        click.echo("run `ihb gc` again when they have finished (or pass --wait)")
    click.echo(f"freed {human_bytes(r.freed_bytes)}: {human_bytes(r.bytes_before)} -> {human_bytes(r.bytes_after)} "
               f"in {r.seconds:.1f} s")


def _print_status(st: dict[str, Any]) -> None:
    p = st["pending"]
    if p is None:
        click.echo("no GC in progress")
    else:
        click.echo(f"pending: {p['condemned_blobs']} condemned blobs ({human_bytes(p['condemned_bytes'])}) since "
                   f"{iso(p['since_ns'])}; waiting for: {', '.join(p['blocking']) or 'nothing'}")
    for s in st["sessions"]:
        click.echo(f"session: {s['description']} - {'live' if s['live'] else 'stale (' + s['why'] + ')'}")


# --- retention locks ------------------------------------------------------------------------------------
@cli.command("lock")
@common_options
@click.argument("snapshot")
@click.option("--until", "until", required=True, help="Lock until DATE (2027-06-30) or for a duration (90d, 1y).")
@click.option("--reason", default="", help="Why (kept with the lock).")
@click.option("--as", "as_", default=None, help="Who locks (default: your login).")
def lock_cmd(ctx: Ctx, snapshot: str, until: str, reason: str, as_: str | None) -> None:
    """Protect a restore point from prune and deletion until a date. Locks only extend; removing one
    needs two approvers (`ihb unlock`)."""
    who = actor_name(as_)
    t = ns(parse_when(until, future=True))
    with ctx.open_repo() as repo:
        snap = repo.get_snapshot(snapshot)
        st = rl.lock(repo, snap, t, who, reason)
    AuditLog.for_config(ctx.cfg).append(who, "lock", snap.id, {"until_ns": t, "effective_until_ns": st.until_ns,
                                                               "reason": reason})
    ctx.emit({"snapshot": snap.id, "locked_until_ns": st.until_ns, "locked_until": iso(st.until_ns)},
             lambda: click.echo(f"restore point {snap.short_id} locked until {iso(st.until_ns)} UTC"))


@cli.command("locks")
@common_options
@click.option("--host", default=None, help="Only this host (or VM).")
def locks_cmd(ctx: Ctx, host: str | None) -> None:
    """List restore points under a retention lock."""
    with ctx.open_repo() as repo:
        snaps = select(repo.snapshots(), host)
        rows = [(s, rl.lock_state(repo, s)) for s in snaps]
    rows = [(s, st) for s, st in rows if st.active()]
    ctx.emit([{"snapshot": s.id, "host": s.vm or s.host, "until_ns": st.until_ns, "by": st.by, "reason": st.reason}
              for s, st in rows],
             lambda: [click.echo(f"{s.short_id}  {s.vm or s.host:20}  until {iso(st.until_ns)}  by {st.by}  {st.reason}")
                      for s, st in rows] or click.echo("no locked restore points"))


@cli.command("unlock")
@common_options
@click.argument("snapshot")
@click.option("--reason", default="", help="Why the lock should go.")
@click.option("--as", "as_", default=None, help="Who asks (default: your login).")
def unlock_cmd(ctx: Ctx, snapshot: str, reason: str, as_: str | None) -> None:
    """Ask for a retention lock to be removed. A second, different person must approve it with
    `ihb approve REQUEST`; the lock is removed then."""
    who = actor_name(as_)
    with ctx.open_repo() as repo:
        snap = repo.get_snapshot(snapshot)
        if not rl.lock_state(repo, snap).active():
            raise InvalidArgument(f"restore point {snap.short_id} is not locked")
        req = ApprovalStore.for_config(ctx.cfg).request("unlock", snap.id, who, reason)
        result = _execute_if_approved(ctx, repo, req, who)
    _emit_request(ctx, req, result)


@cli.command("delete-tenant")
@common_options
@click.argument("tenant")
@click.option("--reason", default="", help="Why (kept in the audit log).")
@click.option("--as", "as_", default=None, help="Who asks (default: your login).")
def delete_tenant(ctx: Ctx, tenant: str, reason: str, as_: str | None) -> None:
    """Ask for every restore point of TENANT to be deleted; runs once a second person approves."""
    who = actor_name(as_)
    with ctx.open_repo() as repo:
        snaps = select(repo.snapshots(), tenant=tenant)
        if not snaps:
            raise InvalidArgument(f"tenant {tenant!r} has no restore points")
        plan_tenant_deletion(repo, tenant)  # refuses now if any is locked
        req = ApprovalStore.for_config(ctx.cfg).request("delete-tenant", tenant, who, reason)
        result = _execute_if_approved(ctx, repo, req, who)
    _emit_request(ctx, req, result)


@cli.command("approve")
@common_options
@click.argument("request_id")
@click.option("--as", "as_", default=None, help="Who approves (default: your login); must differ from the requester.")
def approve(ctx: Ctx, request_id: str, as_: str | None) -> None:
    """Approve a pending request (unlock, delete-tenant); it runs as soon as two people approved."""
    who = actor_name(as_)
    store = ApprovalStore.for_config(ctx.cfg)
    req = store.approve(request_id, who)
    with ctx.open_repo() as repo:
        result = _execute_if_approved(ctx, repo, req, who)
    _emit_request(ctx, req, result)


@cli.command("approvals")
@common_options
@click.option("--all", "show_all", is_flag=True, help="Include executed and expired requests.")
def approvals(ctx: Ctx, show_all: bool) -> None:
    """List approval requests."""
    reqs = ApprovalStore.for_config(ctx.cfg).list(include_done=show_all)

    def human() -> None:
        for r in reqs:
            click.echo(f"{r.id}  {r.state:8}  {r.action} {r.target[:16]}  by {r.requested_by}  approvers "
                       f"{', '.join(n for n, _ in r.approvers)}  expires {iso(r.expires_ns)}  {r.reason}")
        if not reqs:
            click.echo("no pending requests")

    ctx.emit([r.__dict__ for r in reqs], human)


def _execute_if_approved(ctx: Ctx, repo: Repository, req: Request, who: str) -> dict[str, Any] | None:
    if req.state != "approved":
        return None
    store = ApprovalStore.for_config(ctx.cfg)
    if req.action == "unlock":
        snap = repo.get_snapshot(req.target)
        st = rl.unlock(repo, snap, req.approval())
        out = {"snapshot": snap.id, "locked_until_ns": st.until_ns}
        store.executed(req.id, who, "unlocked", out)
        return out
    if req.action == "delete-tenant":
        plan = plan_tenant_deletion(repo, req.target, req.approval())
        rep = plan.execute()
        out = {"deleted": rep.deleted, "skipped_locked": rep.skipped_locked}
        store.executed(req.id, who, f"deleted {len(rep.deleted)} restore points", out)
        return out
    raise InvalidArgument(f"unknown action {req.action}")


def _emit_request(ctx: Ctx, req: Request, result: dict[str, Any] | None) -> None:
    def human() -> None:
        if result is None:
            click.echo(f"request {req.id}: {req.action} {req.target[:16]} approved by "
                       f"{', '.join(n for n, _ in req.approvers)}; a second person must run `ihb approve {req.id}`")
        elif req.action == "unlock":
            click.echo(f"restore point {req.target[:8]} unlocked (approved by {', '.join(n for n, _ in req.approvers)})")
        else:
            click.echo(f"tenant {req.target}: deleted {len(result['deleted'])} restore points "
                       f"(approved by {', '.join(n for n, _ in req.approvers)}); run `ihb gc` to free the space")

    ctx.emit({"request": req.__dict__, "executed": result}, human)
