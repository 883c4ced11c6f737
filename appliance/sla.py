"""The SLA view: for each job, how recent a point and how fast this customer could recover right now.

Why here: the answer combines three records that different commands leave behind, none of which needs
the repository key to read: the job records (age of the last good restore point against the job's
RPO), the verifications (``ihb check`` of the whole repository and ``ihb verify-boot`` of one VM's
restore point, in ``verifications.jsonl``), and the measured restores (``ihb restore`` and
``ihb restore-disk`` leave a job record of kind ``restore`` / ``restore-disk`` whose bytes and
duration give the speed). ``sla_rows`` is pure over those stores and a clock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from appliance.config import Config
from appliance.jobs import JobRecord, JobSpec, JobStore, _JsonLines, last_good_time, rpo_deadline, state_dir

log = logging.getLogger(__name__)

RESTORE_KINDS = ("restore", "restore-disk")


@dataclass
class Verification:
    id: str
    kind: str  # check | check --read-data | verify-boot
    ok: bool
    time_ns: int
    host: str = ""  # verify-boot: the VM; check: "" (the whole repository)
    snapshot: str = ""
    detail: str = ""
    seconds: float | None = None


class VerifyStore:
    """Results of ``ihb check`` and ``ihb verify-boot`` (append-only JSON lines in the state directory)."""

    def __init__(self, directory: str) -> None:
        self._f = _JsonLines(os.path.join(directory, "verifications.jsonl"))

    def put(self, v: Verification) -> Verification:
        self._f.append(asdict(v))
        return v

    def all(self) -> list[Verification]:
        known = Verification.__dataclass_fields__
        return sorted((Verification(**{k: v for k, v in o.items() if k in known}) for o in self._f.fold().values()),
                      key=lambda v: v.time_ns)


def record_verification(cfg: Config | None, kind: str, ok: bool, *, host: str = "", snapshot: str = "",
                        detail: str = "", seconds: float | None = None) -> None:
    """Called by ``ihb check`` and ``ihb verify-boot``; a record that cannot be written is only logged."""
    try:
        VerifyStore(state_dir(cfg)).put(Verification(uuid.uuid4().hex[:16], kind, ok, time.time_ns(), host,
                                                     snapshot, detail, seconds))
    except OSError as e:
        log.warning("verification result not recorded: %s", e)


class RestoreMeasure:
    """Handed to the body of ``measured_restore``: say how much was restored."""

    def __init__(self) -> None:
        self.bytes = 0
        self.files = 0
        self.warnings: list[str] = []

    def done(self, nbytes: int, files: int = 0, warnings: Sequence[str] = ()) -> None:
        self.bytes, self.files = int(nbytes), int(files)
        self.warnings.extend(warnings)


@contextlib.contextmanager
def measured_restore(cfg: Config | None, kind: str, host: str, snapshot: str, tenant: str = "",
                     clock: Callable[[], int] = time.time_ns) -> Iterator[RestoreMeasure]:
    """Time one restore and leave a job record of kind ``restore``/``restore-disk`` (bytes, duration,
    status) so the SLA view can show the measured restore speed per host. Exceptions propagate."""
    m = RestoreMeasure()
    rec = JobRecord(id=uuid.uuid4().hex[:16], job=f"{kind}:{host}", kind=kind, tenant=tenant, host=host,
                    status="running", snapshot=snapshot, start_ns=clock(), pid=os.getpid())
    try:
        yield m
    except BaseException as e:
        rec.status, rec.error = "failed", str(e) or type(e).__name__
        raise
    else:
        rec.status = "warning" if m.warnings else "ok"
    finally:
        rec.end_ns = clock()
        rec.bytes_total = rec.bytes_read = m.bytes
        rec.files = m.files
        rec.warnings = list(m.warnings)
        try:
            JobStore(state_dir(cfg)).put(rec)
        except OSError as e:
            log.warning("restore measurement not recorded: %s", e)


def restore_speed(r: JobRecord) -> float | None:
    """Bytes per second of a finished restore (None when too short to measure)."""
    d = r.duration
    return r.bytes_total / d if d and d > 0 and r.bytes_total else None


def _host_of(spec: JobSpec) -> str:
    return spec.host or (spec.name if spec.kind == "files" else "")


def sla_rows(specs: Sequence[JobSpec], store: JobStore, verifications: Sequence[Verification], now_ns: int,
             first_seen: Mapping[str, int], snapshot_times: Mapping[str, int] | None = None,
             tenant: str | None = None) -> list[dict[str, Any]]:
    """One row per job: last good restore point and its age against the RPO (``ok`` / ``late``), the last
    verification that covers it, and the last measured restore speed of its host."""
    recs = store.all()
    restores: dict[str, JobRecord] = {}
    for r in recs:
        if r.kind in RESTORE_KINDS and r.status in ("ok", "warning") and restore_speed(r) is not None:
            restores[r.host] = r  # records are in time order: the last one wins
    checks = [v for v in verifications if v.kind.startswith("check")]
    boots = [v for v in verifications if v.kind == "verify-boot"]
    out = []
    for spec in specs:
        if tenant is not None and spec.tenant != tenant:
            continue
        host = _host_of(spec)
        last = last_good_time(spec, store, {host: snapshot_times[host]} if snapshot_times and host in snapshot_times
                              else None)
        deadline = rpo_deadline(spec, last, first_seen.get(spec.name, now_ns))
        rpo_status = "none" if deadline is None else ("ok" if now_ns <= deadline else "late")
        mine = [v for v in boots if v.host == host] + checks
        good = [v for v in mine if v.ok]
        lv = max(good, key=lambda v: v.time_ns, default=None)
        lastv = max(mine, key=lambda v: v.time_ns, default=None)
        rs = restores.get(host)
        out.append({
            "job": spec.name, "kind": spec.kind, "tenant": spec.tenant, "host": host,
            "rpo": str(spec.rpo) if spec.rpo else None, "rpo_seconds": None if spec.rpo is None or deadline is None
            else round((deadline - (last or first_seen.get(spec.name, now_ns))) / 1e9),
            "last_good_ns": last, "age_seconds": None if last is None else round((now_ns - last) / 1e9),
            "rpo_status": rpo_status,
            "last_verified_ns": lv.time_ns if lv else None, "verified_by": lv.kind if lv else None,
            "verified_snapshot": (lv.snapshot or None) if lv else None,
            "last_point_verified": bool(lv and last and lv.time_ns >= last),
            "last_verification_failed": bool(lastv and not lastv.ok),
            "last_verification_detail": lastv.detail if lastv and not lastv.ok else None,
            "restore_bytes_per_second": round(restore_speed(rs) or 0) if rs else None,
            "restore_measured_ns": rs.end_ns if rs else None, "restore_kind": rs.kind if rs else None,
            "restore_bytes": rs.bytes_total if rs else None, "restore_seconds": round(rs.duration or 0, 6) if rs else None,
        })
    return out
