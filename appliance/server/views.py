"""What one viewer may see, computed once for the dashboard pages and for /metrics.

Why one module: the tenant boundary must be drawn in exactly one place. Every function takes the
viewer (a ``Principal``: admin sees all, a tenant token its tenant) and returns only rows of that
viewer's tenant; the renderers (dashboard.py, metrics.py) never filter on their own.

The sources are the ones the CLI reads: restore points from the repository, job records from
``appliance.jobs.JobStore`` (the same as `ihb report`), job specs and the SLA rows (RPO age, last
verification, restore speed) from ``appliance.sla`` (`ihb sla`), repository usage from ``repo.check.repository_info`` (`ihb info`). Restore points pushed by
network agents have no job record of their own; they are shown as runs of the job ``agent:HOST``,
built with the same ``fill_record`` the scheduler uses.

Everything here is synchronous and may touch LMDB: the server calls it inside ``to_thread``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance import jobs as J
from appliance.sla import VerifyStore, sla_rows
from repo.check import repository_info

if TYPE_CHECKING:
    from appliance.config import Config
    from repo.repository import Repository
    from repo.snapshot import Snapshot

    from .app import Principal

USAGE_CACHE_SECONDS = 30.0  # repository_info walks the whole chunk index; scrapes and page loads share it


@dataclass
class RestorePointRow:
    tenant: str
    name: str  # host, or VM name
    kind: str  # "host" | "vm"
    count: int
    latest_ns: int
    job: str = ""
    rpo: str = ""
    rpo_seconds: float | None = None
    rpo_ok: bool | None = None

    def age_seconds(self, now_ns: int) -> float:
        return max(0.0, (now_ns - self.latest_ns) / 1e9)


@dataclass
class Overview:
    now_ns: int
    restore_points: list[RestorePointRow]
    runs: list[J.JobRecord]  # oldest first
    specs: list[J.JobSpec]
    usage: dict[str, Any]
    last_good: dict[str, J.JobRecord] = field(default_factory=dict)  # job -> newest good run
    sla: list[dict[str, Any]] = field(default_factory=list)  # appliance.sla.sla_rows of the visible jobs


def _tenant_of(snap: Snapshot) -> str:
    return str(snap.meta.get("tenant", ""))


def visible_snapshots(p: Principal, snaps: list[Snapshot]) -> list[Snapshot]:
    return [s for s in snaps if p.may_see(_tenant_of(s), s.host)]


def visible_specs(p: Principal, cfg: Config) -> list[J.JobSpec]:
    return [s for s in J.load_specs(cfg) if p.may_see(s.tenant, s.host)]


def job_runs(p: Principal, store: J.JobStore, snaps: list[Snapshot]) -> list[J.JobRecord]:
    """Every run the viewer may see, recorded or pushed, oldest first."""
    recs = store.all()
    recorded = {r.snapshot for r in recs if r.snapshot}
    runs = [r for r in recs if p.may_see(r.tenant, r.host)] + J.agent_runs(visible_snapshots(p, snaps), recorded)
    runs.sort(key=lambda r: (r.start_ns or r.queued_ns or 0, r.id))
    return runs


def restore_point_rows(p: Principal, snaps: list[Snapshot], sla: list[dict[str, Any]]) -> list[RestorePointRow]:
    """Per host and per VM: how many restore points and the newest; the RPO status is the SLA row of
    the job that names this host or VM (``appliance.sla``, as `ihb sla`)."""
    rows: dict[tuple[str, str, str], RestorePointRow] = {}
    for s in visible_snapshots(p, snaps):
        kind, name = ("vm", s.vm) if s.vm else ("host", s.host)
        key = (_tenant_of(s), kind, name)
        row = rows.get(key)
        if row is None:
            rows[key] = RestorePointRow(key[0], name, kind, 1, s.time_ns)
        else:
            row.count += 1
            row.latest_ns = max(row.latest_ns, s.time_ns)
    for row in rows.values():
        job = next((j for j in sla if j["rpo_status"] != "none" and j["host"] == row.name
                    and j["tenant"] in ("", row.tenant)), None)
        if job is not None:
            row.job, row.rpo, row.rpo_seconds = job["job"], job["rpo"], job["rpo_seconds"]
            row.rpo_ok = job["rpo_status"] == "ok"
    return sorted(rows.values(), key=lambda r: (r.tenant, r.kind, r.name))


def newest_per_host(snaps: list[Snapshot]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in snaps:
        k = s.vm or s.host
        out[k] = max(out.get(k, 0), s.time_ns)
    return out


class UsageCache:
    """``repository_info`` at most every USAGE_CACHE_SECONDS (it reads every chunk entry)."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self._lock = threading.Lock()
        self._at = 0.0
        self._value: dict[str, Any] | None = None

    def get(self) -> dict[str, Any]:
        with self._lock:
            if self._value is None or time.monotonic() - self._at > USAGE_CACHE_SECONDS:
                self._value = repository_info(self.repo)
                self._at = time.monotonic()
            return dict(self._value)


def usage_for(p: Principal, cache: UsageCache, snaps: list[Snapshot], runs: list[J.JobRecord]) -> dict[str, Any]:
    """Admin: the whole repository (`ihb info`). Tenant: its own restore points and what its runs
    added; repository-wide numbers would tell one tenant about the others' data."""
    if p.is_admin:
        return {"scope": "repository", **cache.get()}
    mine = visible_snapshots(p, snaps)
    original = sum(int(s.stats.get("bytes", 0)) for s in mine)
    new = sum(r.bytes_new for r in runs)
    stored = sum(r.bytes_stored for r in runs)
    return {"scope": "tenant", "snapshots": len(mine), "original_bytes": original, "unique_bytes": new,
            "stored_chunk_bytes": stored, "dedup_ratio": round(original / new, 2) if new else None,
            "compression_ratio": round(new / stored, 2) if stored else None}


def overview(p: Principal, repo: Repository, cfg: Config, cache: UsageCache) -> Overview:
    now = time.time_ns()
    snaps = repo.snapshots()
    d = J.state_dir(cfg)
    store = J.JobStore(d)
    specs = visible_specs(p, cfg)
    runs = job_runs(p, store, snaps)
    sla = sla_rows(specs, store, VerifyStore(d).all(), now, J.SeenStore(d).load(),
                   newest_per_host(visible_snapshots(p, snaps)))
    last_good: dict[str, J.JobRecord] = {}
    for r in runs:
        if r.status in J.GOOD and r.end_ns and (r.job not in last_good or (last_good[r.job].end_ns or 0) < r.end_ns):
            last_good[r.job] = r
    return Overview(now, restore_point_rows(p, snaps, sla), runs, specs, usage_for(p, cache, snaps, runs),
                    last_good, sla)
