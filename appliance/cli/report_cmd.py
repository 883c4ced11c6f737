"""What the service manager reads: `report` (job records as table, JSON, CSV or HTML), `jobs list`,
`jobs run-due` (one scheduler pass), `jobs show`, `alerts`."""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import json
import os
import subprocess
import sys
import time
from typing import Any

import click

from appliance import jobs as J
from appliance.audit import AuditLog
from repo.errors import IhbError, InvalidArgument, RepositoryNotFound

from . import cli
from .common import Ctx, common_options, human_bytes
from .when import iso, ns, parse_when

COLUMNS = ("job", "tenant", "host", "status", "start", "duration_s", "bytes_read", "bytes_new", "bytes_stored",
           "dedup_ratio", "compression_ratio", "files", "skipped", "warnings", "consistency", "queued_s",
           "queue_reason", "snapshot", "error")


def _agent_runs(ctx: Ctx, store: J.JobStore, tenant: str | None, since_ns: int | None,
                job: str | None) -> list[J.JobRecord]:
    """Runs of network agents, read from their restore points (the appliance keeps no record of them);
    none, with a note, when the repository cannot be opened."""
    try:
        with ctx.open_repo() as repo:
            snaps = repo.snapshots()
    except RepositoryNotFound:
        return []
    except IhbError as e:
        click.echo(f"ihb: note: agent runs not shown ({e})", err=True)
        return []
    recorded = {r.snapshot for r in store.all() if r.snapshot}
    return [r for r in J.agent_runs(snaps, recorded)
            if (tenant is None or r.tenant == tenant) and (since_ns is None or (r.start_ns or 0) >= since_ns)
            and (job is None or r.job == job)]


def _csv_cell(v: Any) -> Any:
    """Spreadsheets run cells that start with = + - @ as formulas, and warnings carry file names an agent
    chose: such text gets a leading apostrophe (numbers stay numbers)."""
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


def _row(r: J.JobRecord) -> dict[str, Any]:
    return {"job": r.job, "tenant": r.tenant, "host": r.host, "status": r.status, "start": iso(r.start_ns or r.queued_ns),
            "duration_s": round(r.duration, 1) if r.duration is not None else None, "bytes_read": r.bytes_read,
            "bytes_new": r.bytes_new, "bytes_stored": r.bytes_stored, "dedup_ratio": r.dedup_ratio,
            "compression_ratio": r.compression_ratio, "files": r.files, "skipped": r.skipped_count,
            "warnings": "; ".join(r.warnings), "consistency": r.consistency, "queued_s": r.queued_seconds,
            "queue_reason": r.queue_reason, "snapshot": (r.snapshot or "")[:12], "error": r.error}


def _ratio(v: float | None) -> str:
    return f"{v:.1f}x" if v else "-"


@cli.command()
@common_options
@click.option("--tenant", default=None, help="Only this tenant's jobs.")
@click.option("--since", default=None, help="Only runs since DATE (2026-11-01, or 7d for the last 7 days).")
@click.option("--job", default=None, help="Only this job.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "html"]), default="table",
              show_default=True)
def report(ctx: Ctx, tenant: str | None, since: str | None, job: str | None, fmt: str) -> None:
    """Every job run with its sizes, ratios, warnings and consistency level. JSON and HTML also carry the
    SLA view (as `ihb sla`): {"runs": [...], "sla": {"rows": [...]}}."""
    from .sla_cmd import collect_sla, render_html_section

    since_ns = ns(parse_when(since)) if since else None
    store = J.JobStore(J.state_dir(ctx.cfg))
    recs = store.query(tenant, since_ns, job) + _agent_runs(ctx, store, tenant, since_ns, job)
    recs.sort(key=lambda r: (r.start_ns or r.queued_ns or 0, r.id))
    rows = [_row(r) for r in recs]
    if ctx.json or fmt == "json":
        click.echo(json.dumps({"runs": [r.to_obj() for r in recs], "sla": collect_sla(ctx, tenant)}, indent=1,
                              default=str))
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: _csv_cell(v) for k, v in r.items()} for r in rows)
        click.echo(buf.getvalue(), nl=False)
    elif fmt == "html":
        click.echo(render_html(rows, tenant, since, render_html_section(collect_sla(ctx, tenant))))
    else:
        click.echo(f"{'JOB':20} {'STATUS':8} {'START (UTC)':19} {'DUR':>7} {'READ':>10} {'NEW':>10} {'STORED':>10} "
                   f"{'DEDUP':>6} {'COMPR':>6} {'SKIP':>5}  CONSISTENCY")
        for r in recs:
            dur = f"{r.duration:.0f}s" if r.duration is not None else "-"
            click.echo(f"{r.job[:20]:20} {r.status:8} {iso(r.start_ns or r.queued_ns):19} {dur:>7} "
                       f"{human_bytes(r.bytes_read):>10} {human_bytes(r.bytes_new):>10} {human_bytes(r.bytes_stored):>10} "
                       f"{_ratio(r.dedup_ratio):>6} {_ratio(r.compression_ratio):>6} {r.skipped_count:>5}  {r.consistency}"
                       + (f"  error: {r.error}" if r.error else "")
                       + (f"  queued {r.queued_seconds:.0f}s: {r.queue_reason}" if r.queue_reason else ""))
        bad = sum(1 for r in recs if r.status == "failed")
        click.echo(f"{len(recs)} runs, {bad} failed")


def render_html(rows: list[dict[str, Any]], tenant: str | None, since: str | None, extra: str = "") -> str:
    title = "ihb job report" + (f" - tenant {tenant}" if tenant else "") + (f" since {since}" if since else "")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for r in rows:
        cls = {"failed": "bad", "warning": "warn"}.get(str(r["status"]), "")
        cells = "".join(f"<td>{html.escape('' if r[c] is None else str(r[c]))}</td>" for c in COLUMNS)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
            "font-size:90%}tr.bad{background:#fdd}tr.warn{background:#ffd}</style></head><body><h1>"
            + html.escape(title) + f"</h1><p>generated {iso(time.time_ns())} UTC, {len(rows)} runs</p><table><tr>"
            + head + "</tr>" + "".join(body) + "</table>" + extra + "</body></html>")


@cli.group("jobs")
def jobs_group() -> None:
    """Configured backup jobs ([[jobs]] in the config), their schedules and RPO."""


@jobs_group.command("list")
@common_options
def jobs_list(ctx: Ctx) -> None:
    """Each job: schedule, next run, last result, RPO status."""
    specs = J.load_specs(ctx.cfg)
    store = J.JobStore(J.state_dir(ctx.cfg))
    now = dt.datetime.now(dt.UTC)
    seen = J.SeenStore(J.state_dir(ctx.cfg)).load()
    out = []
    for s in specs:
        recs = store.query(job=s.name)
        last = recs[-1] if recs else None
        good = store.last_good(s.name)
        deadline = J.rpo_deadline(s, good.end_ns if good else None, seen.get(s.name, ns(now)))
        out.append({"job": s.name, "kind": s.kind, "tenant": s.tenant, "host": s.host,
                    "schedule": s.schedule.expr if s.schedule else None,
                    "next_run": s.schedule.next_after(now).isoformat() if s.schedule else None,
                    "last_status": last.status if last else None, "last_start": iso(last.start_ns) if last else None,
                    "last_good_end": iso(good.end_ns) if good else None, "rpo": str(s.rpo) if s.rpo else None,
                    "rpo_ok": None if deadline is None else ns(now) <= deadline,
                    "physical_host": s.physical_host, "datastores": list(s.datastores)})

    def human() -> None:
        click.echo(f"{'JOB':20} {'KIND':6} {'SCHEDULE':16} {'NEXT RUN (UTC)':19} {'LAST':8} {'LAST GOOD':19} RPO")
        for o in out:
            rpo = "-" if o["rpo"] is None else f"{o['rpo']} {'ok' if o['rpo_ok'] else 'MISSED'}"
            nxt = (o["next_run"] or "-")[:19].replace("T", " ")
            click.echo(f"{o['job'][:20]:20} {o['kind']:6} {o['schedule'] or '-':16} {nxt:19} "
                       f"{o['last_status'] or '-':8} {o['last_good_end'] or '-':19} {rpo}")
        if not out:
            click.echo("no jobs configured ([[jobs]] in the config file)")

    ctx.emit(out, human)


@jobs_group.command("run-due")
@common_options
@click.option("--dry-run", "-n", is_flag=True, help="Show which jobs are due and which would wait; run nothing.")
def jobs_run_due(ctx: Ctx, dry_run: bool) -> None:
    """Run every job whose schedule fired since its last run, within the concurrency caps
    ([scheduler] max_concurrent, per_physical_host, per_datastore), then check every job's RPO.

    Meant for a systemd timer or cron every minute until the appliance daemon schedules by itself.
    """
    env = dict(os.environ)
    env.update({"IHB_REPO": ctx.repo_path})
    if ctx.passphrase_file:
        env["IHB_PASSPHRASE_FILE"] = ctx.passphrase_file
    if ctx.cfg.path:
        env["IHB_CONFIG"] = ctx.cfg.path
    logdir = os.path.join(J.state_dir(ctx.cfg), "logs")
    os.makedirs(logdir, exist_ok=True)

    def spawn(spec: J.JobSpec, rec: J.JobRecord) -> _Child:
        return _Child([sys.executable, "-m", "appliance.cli", *spec.command(), "--json"],
                      {**env, "IHB_JOB_RECORD": rec.id}, os.path.join(logdir, rec.id))

    snapshot_times = _snapshot_times(ctx)
    res = J.run_due(ctx.cfg, spawn, dry_run=dry_run, snapshot_times=snapshot_times)
    if not dry_run and (res.due or res.alerts):
        AuditLog.for_config(ctx.cfg).append("scheduler", "run-due", "",
                                            {"started": [r.job for r in res.due],
                                             "alerts": [a.message for a in res.alerts]})

    def human() -> None:
        if not res.due:
            click.echo("no job is due")
        for r in res.finished:
            click.echo(f"{r.job}: {r.status}" + (f" ({r.error})" if r.error else "")
                       + (f", waited {r.queued_seconds:.0f}s: {r.queue_reason}" if r.queue_reason else ""))
        if dry_run:
            for r in res.due:
                click.echo(f"due: {r.job}")
        for job, why in res.queue_events:
            click.echo(f"queued {job}: {why}")
        for a in res.alerts:
            click.echo(f"ALERT: {a.message}")

    ctx.emit({"due": [r.job for r in res.due], "finished": [r.to_obj() for r in res.finished],
              "queued": [{"job": j, "reason": w} for j, w in res.queue_events],
              "alerts": [a.to_obj() for a in res.alerts], "max_running": res.max_running}, human)
    if any(r.status == "failed" for r in res.finished):
        raise SystemExit(1)


class _Child:
    """A backup command run by the scheduler: JSON summary to ``<id>.out``, messages to ``<id>.log``."""

    def __init__(self, argv: list[str], env: dict[str, str], base: str) -> None:
        self.out_path = base + ".out"
        with open(self.out_path, "wb") as out, open(base + ".log", "wb") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=log, stdin=subprocess.DEVNULL)

    def poll(self) -> int | None:
        return self.proc.poll()

    def output(self) -> bytes:
        with open(self.out_path, "rb") as f:
            return f.read()


def _snapshot_times(ctx: Ctx) -> dict[str, int]:
    """Newest restore point per host/VM, so agent jobs are judged by what they pushed."""
    try:
        with ctx.open_repo() as repo:
            out: dict[str, int] = {}
            for s in repo.snapshots():
                k = s.vm or s.host
                out[k] = max(out.get(k, 0), s.time_ns)
            return out
    except RepositoryNotFound:
        return {}


@jobs_group.command("show")
@common_options
@click.argument("record_id")
def jobs_show(ctx: Ctx, record_id: str) -> None:
    """One job record in full (skipped files included)."""
    recs = [r for r in J.JobStore(J.state_dir(ctx.cfg)).all() if r.id.startswith(record_id)]
    if len(recs) != 1:
        raise InvalidArgument(f"no single job record matches {record_id!r}; see `ihb report`")
    o = recs[0].to_obj()
    ctx.emit(o, lambda: [click.echo(f"{k:18} {v}") for k, v in o.items()])


@cli.command("alerts")
@common_options
@click.option("--all", "show_all", is_flag=True, help="Include resolved alerts.")
def alerts_cmd(ctx: Ctx, show_all: bool) -> None:
    """Open alerts (missed RPO)."""
    al = [a for a in J.AlertStore(J.state_dir(ctx.cfg)).all() if show_all or a.resolved_ns is None]
    ctx.emit([a.to_obj() for a in al],
             lambda: [click.echo(f"{iso(a.raised_ns)}  {a.kind:11} {a.job:20} {a.message}"
                                 + (f"  (resolved {iso(a.resolved_ns)})" if a.resolved_ns else "")) for a in al]
             or click.echo("no open alerts"))
