"""``GET /metrics``: Prometheus text exposition format 0.0.4, rendered from ``views.Overview``.

Every series that belongs to a tenant carries a ``tenant`` label ("" for the appliance's own local
jobs). A tenant token gets only its own tenant's series and no repository-wide gauges; an admin
token (or, with ``[server] metrics_open_on_loopback = true``, any client on 127.0.0.1/::1) gets all.
The metric names and their meaning are listed in docs/protocol.md §5.4.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from appliance import jobs as J

from .views import Overview

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUSES = ("queued", "running", "ok", "warning", "failed")


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


@dataclass
class Family:
    name: str
    kind: str  # gauge | counter | summary
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)  # (suffix, labels, value)

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        self.samples.append((suffix, labels, value))

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for suffix, labels, value in self.samples:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            yield f"{self.name}{suffix}{{{lab}}} {_value(value)}" if lab else f"{self.name}{suffix} {_value(value)}"


def render(ov: Overview, requests: list[tuple[str, str, int]] | None = None) -> str:
    """The exposition text. ``requests``: (tenant, state, count) of restore requests, when known."""
    fam = {f.name: f for f in (
        Family("ihb_job_runs_total", "counter", "Job runs recorded, by final or current status."),
        Family("ihb_job_duration_seconds", "summary", "Wall-clock duration of finished job runs."),
        Family("ihb_job_read_bytes_total", "counter", "Bytes read by finished job runs."),
        Family("ihb_job_new_bytes_total", "counter", "Bytes that were new to the repository (after deduplication)."),
        Family("ihb_job_stored_bytes_total", "counter", "Bytes written to packs (after compression)."),
        Family("ihb_job_last_duration_seconds", "gauge", "Duration of the newest finished run of the job."),
        Family("ihb_job_last_read_bytes", "gauge", "Bytes read by the newest finished run of the job."),
        Family("ihb_job_last_new_bytes", "gauge", "New bytes of the newest finished run of the job."),
        Family("ihb_job_last_stored_bytes", "gauge", "Stored bytes of the newest finished run of the job."),
        Family("ihb_job_last_success_timestamp_seconds", "gauge", "End time of the newest good (ok or warning) run."),
        Family("ihb_job_rpo_seconds", "gauge", "The job's recovery point objective."),
        Family("ihb_job_rpo_ok", "gauge", "1 while the newest good restore point is within the RPO, else 0."),
        Family("ihb_job_last_verified_timestamp_seconds", "gauge",
               "Newest successful verification (check, verify-boot) covering the job's restore points."),
        Family("ihb_job_restore_bytes_per_second", "gauge", "Speed of the last measured restore of the job's host."),
        Family("ihb_restore_points", "gauge", "Restore points per host or VM."),
        Family("ihb_restore_point_latest_timestamp_seconds", "gauge", "Time of the newest restore point per host or VM."),
        Family("ihb_restore_requests", "gauge", "Restore requests by state."),
        Family("ihb_repository_original_bytes", "gauge", "Logical size of all restore points."),
        Family("ihb_repository_unique_bytes", "gauge", "Size of the distinct chunks (after deduplication)."),
        Family("ihb_repository_stored_bytes", "gauge", "Bytes of the pack files (after compression and encryption)."),
        Family("ihb_repository_packs", "gauge", "Pack files in the repository."),
        Family("ihb_repository_chunks", "gauge", "Distinct chunks in the repository."),
        Family("ihb_repository_snapshots", "gauge", "Restore points in the repository."),
        Family("ihb_repository_dedup_ratio", "gauge", "Original bytes divided by unique bytes."),
        Family("ihb_repository_compression_ratio", "gauge", "Unique bytes divided by stored chunk bytes."),
    )}
    counts: Counter[tuple[str, str, str]] = Counter()
    last: dict[tuple[str, str], J.JobRecord] = {}
    sums: dict[tuple[str, str], list[float]] = {}
    for r in ov.runs:
        key = (r.job, r.tenant)
        counts[(r.job, r.tenant, r.status)] += 1
        if r.duration is None or r.status not in ("ok", "warning", "failed"):
            continue
        s = sums.setdefault(key, [0.0, 0, 0, 0, 0, 0])
        s[0] += r.duration
        s[1] += 1
        s[2] += r.bytes_read
        s[3] += r.bytes_new
        s[4] += r.bytes_stored
        if key not in last or (last[key].end_ns or 0) <= (r.end_ns or 0):
            last[key] = r
    for job, tenant in sorted({(j, t) for j, t, _ in counts}):
        for st in STATUSES:
            fam["ihb_job_runs_total"].add(counts[(job, tenant, st)], job=job, tenant=tenant, status=st)
    for (job, tenant), s in sorted(sums.items()):
        lab = {"job": job, "tenant": tenant}
        fam["ihb_job_duration_seconds"].add(s[0], "_sum", **lab)
        fam["ihb_job_duration_seconds"].add(s[1], "_count", **lab)
        fam["ihb_job_read_bytes_total"].add(s[2], **lab)
        fam["ihb_job_new_bytes_total"].add(s[3], **lab)
        fam["ihb_job_stored_bytes_total"].add(s[4], **lab)
        r = last[(job, tenant)]
        fam["ihb_job_last_duration_seconds"].add(r.duration or 0.0, **lab)
        fam["ihb_job_last_read_bytes"].add(r.bytes_read, **lab)
        fam["ihb_job_last_new_bytes"].add(r.bytes_new, **lab)
        fam["ihb_job_last_stored_bytes"].add(r.bytes_stored, **lab)
    for job, r in sorted(ov.last_good.items()):
        fam["ihb_job_last_success_timestamp_seconds"].add((r.end_ns or 0) / 1e9, job=job, tenant=r.tenant)
    for row in ov.restore_points:
        lab = {"tenant": row.tenant, "host": row.name, "kind": row.kind}
        fam["ihb_restore_points"].add(row.count, **lab)
        fam["ihb_restore_point_latest_timestamp_seconds"].add(row.latest_ns / 1e9, **lab)
    for j in ov.sla:
        jl = {"job": j["job"], "tenant": j["tenant"]}
        if j["rpo_seconds"] is not None:
            fam["ihb_job_rpo_seconds"].add(j["rpo_seconds"], **jl)
        if j["rpo_status"] != "none":
            fam["ihb_job_rpo_ok"].add(1 if j["rpo_status"] == "ok" else 0, **jl)
        if j["last_verified_ns"]:
            fam["ihb_job_last_verified_timestamp_seconds"].add(j["last_verified_ns"] / 1e9, **jl)
        if j["restore_bytes_per_second"] is not None:
            fam["ihb_job_restore_bytes_per_second"].add(j["restore_bytes_per_second"], **jl)
    for tenant, state, n in sorted(requests or ()):
        fam["ihb_restore_requests"].add(n, tenant=tenant, state=state)
    u = ov.usage
    if u.get("scope") == "repository":
        for name, key in (("original_bytes", "original_bytes"), ("unique_bytes", "unique_bytes"),
                          ("stored_bytes", "pack_bytes"), ("packs", "packs"), ("chunks", "chunks"),
                          ("snapshots", "snapshots"), ("dedup_ratio", "dedup_ratio"),
                          ("compression_ratio", "compression_ratio")):
            if u.get(key) is not None:
                fam[f"ihb_repository_{name}"].add(float(u[key]))
    lines = [ln for f in fam.values() if f.samples for ln in f.render()]
    return "\n".join(lines) + "\n"
