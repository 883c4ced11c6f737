"""`ihb sla`: per job, the age of the last good restore point against its RPO, when it was last
verified, and the measured restore speed of its host (also the `sla` section of `ihb report`)."""

from __future__ import annotations

import html
import time
from typing import Any

import click

from appliance import jobs as J
from appliance.sla import VerifyStore, sla_rows
from repo.errors import IhbError

from . import cli
from .common import Ctx, common_options, human_bytes
from .when import iso


def collect_sla(ctx: Ctx, tenant: str | None) -> dict[str, Any]:
    """The SLA rows for the configured jobs, with the repository's newest restore point per host when the
    repository can be opened (agents push restore points the job records do not know of)."""
    from .report_cmd import _snapshot_times

    d = J.state_dir(ctx.cfg)
    note = None
    try:
        times: dict[str, int] | None = _snapshot_times(ctx)
    except IhbError as e:
        times, note = None, f"restore points not read ({e}); ages come from job records only"
    now = time.time_ns()
    rows = sla_rows(J.load_specs(ctx.cfg), J.JobStore(d), VerifyStore(d).all(), now, J.SeenStore(d).load(), times,
                    tenant)
    return {"generated_ns": now, "rows": rows, "note": note}


def _age(s: int | None) -> str:
    if s is None:
        return "-"
    return f"{s / 86400:.1f}d" if s >= 86400 else f"{s / 3600:.1f}h" if s >= 3600 else f"{s / 60:.0f}m"


def cells(r: dict[str, Any]) -> dict[str, str]:
    """One row as the texts shown in the table and the HTML report."""
    status = {"ok": "OK", "late": "LATE", "none": "no RPO"}[r["rpo_status"]]
    verified = "never" if r["last_verified_ns"] is None else f"{iso(r['last_verified_ns'])} ({r['verified_by']})"
    if r["last_verification_failed"]:
        verified += " - last one FAILED"
    speed = ("not measured" if r["restore_bytes_per_second"] is None else
             f"{human_bytes(r['restore_bytes_per_second'])}/s ({r['restore_kind']}, {iso(r['restore_measured_ns'])})")
    return {"job": r["job"], "tenant": r["tenant"], "host": r["host"], "rpo": r["rpo"] or "-",
            "last good": iso(r["last_good_ns"]) if r["last_good_ns"] else "never", "age": _age(r["age_seconds"]),
            "status": status, "verified": verified, "restore speed": speed}


def render_html_section(sla: dict[str, Any]) -> str:
    rows = [cells(r) for r in sla["rows"]]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) if rows else ""
    body = "".join(f'<tr class="{"bad" if c["status"] == "LATE" else ""}">'
                   + "".join(f"<td>{html.escape(v)}</td>" for v in c.values()) + "</tr>" for c in rows)
    note = f"<p>{html.escape(sla['note'])}</p>" if sla.get("note") else ""
    return (f'<h2 id="sla">SLA: recovery point and restore speed per job</h2>{note}'
            + (f"<table><tr>{head}</tr>{body}</table>" if rows else "<p>no jobs configured</p>"))


@cli.command("sla")
@common_options
@click.option("--tenant", default=None, help="Only this tenant's jobs.")
def sla_cmd(ctx: Ctx, tenant: str | None) -> None:
    """How recent a point and how fast each job's host could be recovered right now: age of the last good
    restore point against the RPO (OK/LATE), last verification (check or verify-boot), last measured
    restore speed (`ihb restore`, `ihb restore-disk`). Exit 0, or 1 if any job is late."""
    sla = collect_sla(ctx, tenant)

    def human() -> None:
        rows = [cells(r) for r in sla["rows"]]
        if sla["note"]:
            click.echo(f"note: {sla['note']}", err=True)
        if not rows:
            click.echo("no jobs configured ([[jobs]] in the config file)")
            return
        click.echo(f"{'JOB':16} {'TENANT':10} {'RPO':5} {'LAST GOOD (UTC)':19} {'AGE':>6} {'STATUS':6}  "
                   f"{'LAST VERIFIED':40} RESTORE SPEED")
        for c in rows:
            click.echo(f"{c['job'][:16]:16} {c['tenant'][:10]:10} {c['rpo']:5} {c['last good']:19} {c['age']:>6} "
                       f"{c['status']:6}  {c['verified'][:40]:40} {c['restore speed']}")

    ctx.emit(sla, human)
    if any(r["rpo_status"] == "late" for r in sla["rows"]):
        raise SystemExit(1)
