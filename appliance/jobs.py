"""Jobs: what the appliance backs up when, what each run did, and whether every job meets its RPO.

Why here and why plain files: the records are what the service manager reads ("did it work, how much,
how consistent") and what the server's dashboard, metrics and notifications will read, so they must
survive crashes and be readable without the repository key. Each store is an append-only JSON-lines
file under the state directory (``data_dir()/jobs`` or ``[service] state_dir``); a line is a complete
record, the last line of an id wins, lines are appended under ``flock`` and fsync'ed.

Pieces, each testable alone:

* ``JobSpec``: a ``[[jobs]]`` entry of the config (kind ``files`` | ``image`` | ``vm`` run by the
  appliance; ``agent`` | ``db`` are *expected*: the agents push, the appliance only checks the RPO);
* ``CronSchedule``: ``minute hour day-of-month month day-of-week`` (ranges, lists, steps, names,
  ``@hourly``...; Vixie semantics: if both day fields are restricted, either may match), evaluated in
  UTC or the job's ``tz``;
* ``schedule()``: a *pure* decision of which due jobs start now under the concurrency caps (per
  appliance, per physical host, per datastore), with the reason each other job stays queued; the
  caller's clock is a parameter, so tests drive it with a fake one;
* ``JobStore`` / ``AlertStore``: the records; ``evaluate_rpo`` raises an ``rpo-missed`` alert once per
  breach and resolves it when a good run arrives, ``job_finished`` does the same with ``job-failed``
  for failed runs; each transition is handed once to the ``alert_hook`` (``appliance.notify``);
* ``recorded_job``: the hook the backup commands wrap around their work (``ihb backup``,
  ``ihb backup-image``); a run started by ``ihb jobs run-due`` passes its record id in
  ``IHB_JOB_RECORD`` so the command completes the queued record instead of creating one.
"""

from __future__ import annotations

import calendar
import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from appliance.config import Config, data_dir
from appliance.statefile import exclusive, locked_append
from repo.errors import InvalidArgument
from repo.retention import Duration

log = logging.getLogger(__name__)

RUNNABLE = ("files", "image", "vm")  # the appliance runs these itself
EXPECTED = ("agent", "db")  # pushed by agents; the appliance only checks their RPO
GOOD = ("ok", "warning")
MAX_SKIPPED_KEPT = 200  # skipped-file entries kept per record (the count is always exact)


def state_dir(cfg: Config | None = None) -> str:
    svc = (cfg.raw.get("service") if cfg else None) or {}
    d = str(svc.get("state_dir") or os.path.join(data_dir(), "jobs"))
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


# --- cron ------------------------------------------------------------------------------------------------
_NAMES = {
    3: {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m},
    4: {d.lower(): (i + 1) % 7 for i, d in enumerate(calendar.day_abbr)},  # mon=1 ... sun=0
}
_ALIASES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0",
            "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *"}
_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_FIELD_NAMES = ("minute", "hour", "day of month", "month", "day of week")


@dataclass(frozen=True)
class CronSchedule:
    """A five-field cron expression. ``next_after`` / ``prev_at_or_before`` walk days, not minutes."""

    expr: str
    minutes: frozenset[int]
    hours: frozenset[int]
    doms: frozenset[int]
    months: frozenset[int]
    dows: frozenset[int]
    dom_any: bool
    dow_any: bool
    tz: str = "UTC"

    @classmethod
    def parse(cls, expr: str, tz: str = "UTC") -> CronSchedule:
        text = _ALIASES.get(expr.strip().lower(), expr.strip())
        parts = text.split()
        if len(parts) != 5:
            raise InvalidArgument(f"schedule {expr!r}: expected 5 fields (minute hour day-of-month month "
                                  "day-of-week) or @hourly/@daily/@weekly/@monthly/@yearly")
        sets = [_parse_field(p, i, expr) for i, p in enumerate(parts)]
        dows = frozenset(d % 7 for d in sets[4])
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidArgument(f"schedule time zone {tz!r} is unknown") from None
        return cls(expr, frozenset(sets[0]), frozenset(sets[1]), frozenset(sets[2]), frozenset(sets[3]), dows,
                   parts[2] == "*", parts[4] == "*", tz)

    def _day_ok(self, d: _dt.date) -> bool:
        if d.month not in self.months:
            return False
        dom = d.day in self.doms
        dow = (d.isoweekday() % 7) in self.dows
        if self.dom_any and self.dow_any:
            return True
        if self.dom_any:
            return dow
        if self.dow_any:
            return dom
        return dom or dow

    def matches(self, t: _dt.datetime) -> bool:
        lt = t.astimezone(ZoneInfo(self.tz))
        return self._day_ok(lt.date()) and lt.hour in self.hours and lt.minute in self.minutes

    def next_after(self, t: _dt.datetime) -> _dt.datetime:
        """The first firing time strictly after ``t`` (aware datetimes; result in UTC)."""
        zone = ZoneInfo(self.tz)
        lt = t.astimezone(zone).replace(second=0, microsecond=0, tzinfo=None)
        start = lt + _dt.timedelta(minutes=1)
        day = start.date()
        for _ in range(366 * 5):
            if self._day_ok(day):
                for h in sorted(self.hours):
                    for m in sorted(self.minutes):
                        cand = _dt.datetime(day.year, day.month, day.day, h, m)
                        if cand >= start:
                            return cand.replace(tzinfo=zone).astimezone(_dt.UTC)
            day += _dt.timedelta(days=1)
        raise InvalidArgument(f"schedule {self.expr!r} never fires")

    def prev_at_or_before(self, t: _dt.datetime) -> _dt.datetime:
        """The last firing time at or before ``t``."""
        zone = ZoneInfo(self.tz)
        lt = t.astimezone(zone).replace(second=0, microsecond=0, tzinfo=None)
        day = lt.date()
        for _ in range(366 * 5):
            if self._day_ok(day):
                for h in sorted(self.hours, reverse=True):
                    for m in sorted(self.minutes, reverse=True):
                        cand = _dt.datetime(day.year, day.month, day.day, h, m)
                        if cand <= lt:
                            return cand.replace(tzinfo=zone).astimezone(_dt.UTC)
            day -= _dt.timedelta(days=1)
        raise InvalidArgument(f"schedule {self.expr!r} never fires")


def _parse_field(text: str, i: int, expr: str) -> set[int]:
    lo, hi = _BOUNDS[i]
    out: set[int] = set()
    names = _NAMES.get(i, {})

    def num(s: str) -> int:
        s = s.lower()
        if s in names:
            return names[s]
        if not s.isdigit():
            raise InvalidArgument(f"schedule {expr!r}: {s!r} is not valid in the {_FIELD_NAMES[i]} field")
        return int(s)

    for part in text.split(","):
        m = re.fullmatch(r"(\*|[^-/]+(?:-[^-/]+)?)(?:/(\d+))?", part)
        if not m:
            raise InvalidArgument(f"schedule {expr!r}: cannot read {part!r} in the {_FIELD_NAMES[i]} field")
        rng, step = m.group(1), int(m.group(2) or 1)
        if step < 1:
            raise InvalidArgument(f"schedule {expr!r}: a step must be at least 1")
        if rng == "*":
            a, b = lo, hi if i != 4 else 6
        elif "-" in rng:
            a, b = (num(x) for x in rng.split("-", 1))
        else:
            a = num(rng)
            b = hi if m.group(2) else a
        if not (lo <= a <= hi and lo <= b <= hi) or a > b:
            raise InvalidArgument(f"schedule {expr!r}: {part!r} is outside {lo}-{hi} ({_FIELD_NAMES[i]})")
        out.update(range(a, b + 1, step))
    return out


# --- job specs -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSpec:
    name: str
    kind: str
    schedule: CronSchedule | None
    rpo: Duration | None
    tenant: str = ""
    host: str = ""  # host name, or VM name for image/vm jobs
    paths: tuple[str, ...] = ()
    source: str = ""  # image: the image/device path; vm: the QMP socket
    disk: str = ""
    physical_host: str = ""  # where the VM runs (from the hypervisor connection, or the config)
    datastores: tuple[str, ...] = ()
    args: tuple[str, ...] = ()  # extra arguments for the backup command

    @classmethod
    def from_obj(cls, o: Mapping[str, Any]) -> JobSpec:
        try:
            name, kind = str(o["name"]), str(o.get("kind", "files"))
        except KeyError:
            raise InvalidArgument("every [[jobs]] entry needs a name") from None
        if kind not in RUNNABLE + EXPECTED:
            raise InvalidArgument(f"job {name}: kind must be one of {', '.join(RUNNABLE + EXPECTED)}")
        sched = o.get("schedule")
        ds = o.get("datastores", o.get("datastore", ()))
        spec = cls(
            name=name, kind=kind,
            schedule=CronSchedule.parse(str(sched), str(o.get("tz", "UTC"))) if sched else None,
            rpo=Duration.parse(str(o["rpo"])) if o.get("rpo") else None,
            tenant=str(o.get("tenant", "")), host=str(o.get("host", o.get("vm", ""))),
            paths=tuple(str(p) for p in o.get("paths", ())), source=str(o.get("source", o.get("qmp", ""))),
            disk=str(o.get("disk", "")), physical_host=str(o.get("physical_host", "")),
            datastores=tuple([ds] if isinstance(ds, str) else [str(x) for x in ds]),
            args=tuple(str(a) for a in o.get("args", ())))
        if kind == "files" and not spec.paths:
            raise InvalidArgument(f"job {name}: a files job needs paths")
        if kind == "image" and not (spec.source and spec.disk and spec.host):
            raise InvalidArgument(f"job {name}: an image job needs vm (or host), disk and source")
        if kind == "vm" and not spec.source:
            raise InvalidArgument(f"job {name}: a vm job needs qmp (the VM's QMP socket)")
        return spec

    def command(self) -> list[str]:
        """The `ihb` arguments that run this job."""
        tenant = ["--tenant", self.tenant] if self.tenant else []  # the restore point records its owner
        if self.kind == "files":
            return ["backup", *self.paths, "--host", self.host or self.name, *tenant, *self.args]
        if self.kind == "image":
            return ["backup-image", "--vm", self.host, "--disk", self.disk, *tenant, self.source, *self.args]
        if self.kind == "vm":
            return ["vm", "backup", "--qmp", self.source, *(["--vm", self.host] if self.host else []), *tenant,
                    *self.args]
        raise InvalidArgument(f"job {self.name} ({self.kind}) is run by its agent, not by the appliance")


def load_specs(cfg: Config) -> list[JobSpec]:
    jobs = cfg.raw.get("jobs", [])
    if not isinstance(jobs, list):
        raise InvalidArgument("[[jobs]] must be an array of tables")
    specs = [JobSpec.from_obj(j) for j in jobs]
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise InvalidArgument(f"job names must be unique: {', '.join(sorted(dup))}")
    return specs


@dataclass(frozen=True)
class Caps:
    """Concurrency limits; None = unlimited."""

    max_concurrent: int | None = 4
    per_physical_host: int | None = 1
    per_datastore: int | None = 2

    @classmethod
    def from_config(cls, cfg: Config) -> Caps:
        s = cfg.raw.get("scheduler", {}) or {}

        def opt(k: str, d: int | None) -> int | None:
            v = s.get(k, d)
            return None if v in (None, 0, "unlimited") else int(v)

        return cls(opt("max_concurrent", 4), opt("per_physical_host", 1), opt("per_datastore", 2))


# --- the pure scheduler ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A due run waiting for a slot."""

    job: str
    due_ns: int
    physical_host: str = ""
    datastores: tuple[str, ...] = ()
    deadline_ns: int | None = None  # when its RPO would be missed; the most urgent starts first


@dataclass(frozen=True)
class RunningJob:
    job: str
    physical_host: str = ""
    datastores: tuple[str, ...] = ()


@dataclass
class Decision:
    start: list[Candidate] = field(default_factory=list)
    queued: list[tuple[Candidate, str]] = field(default_factory=list)


def schedule(candidates: Iterable[Candidate], running: Iterable[RunningJob], caps: Caps, now_ns: int) -> Decision:
    """Which candidates start now. Never more than ``caps`` allow, counting the running ones; the rest
    stay queued with a reason naming the saturated resource and who holds it. Pure: same inputs, same
    decision (``now_ns`` only orders jobs whose RPO is already at risk)."""
    busy = list(running)
    by_host: dict[str, list[str]] = {}
    by_ds: dict[str, list[str]] = {}
    for r in busy:
        if r.physical_host:
            by_host.setdefault(r.physical_host, []).append(r.job)
        for d in r.datastores:
            by_ds.setdefault(d, []).append(r.job)
    total = len(busy)
    running_names = {r.job for r in busy}
    out = Decision()
    order = sorted(candidates, key=lambda c: (c.deadline_ns if c.deadline_ns is not None else 1 << 62, c.due_ns, c.job))
    for c in order:
        if c.job in running_names:
            out.queued.append((c, "the previous run of this job is still running"))
            continue
        reason = None
        if caps.max_concurrent is not None and total >= caps.max_concurrent:
            reason = f"appliance at its limit of {caps.max_concurrent} concurrent backups"
        elif c.physical_host and caps.per_physical_host is not None and \
                len(by_host.get(c.physical_host, ())) >= caps.per_physical_host:
            holders = by_host[c.physical_host]
            reason = (f"physical host {c.physical_host} at its limit of {caps.per_physical_host} "
                      f"(running: {', '.join(holders)})")
        else:
            for d in c.datastores:
                if caps.per_datastore is not None and len(by_ds.get(d, ())) >= caps.per_datastore:
                    reason = f"datastore {d} at its limit of {caps.per_datastore} (running: {', '.join(by_ds[d])})"
                    break
        if reason:
            out.queued.append((c, reason))
            continue
        out.start.append(c)
        total += 1
        running_names.add(c.job)
        if c.physical_host:
            by_host.setdefault(c.physical_host, []).append(c.job)
        for d in c.datastores:
            by_ds.setdefault(d, []).append(c.job)
    return out


# --- records ---------------------------------------------------------------------------------------------
@dataclass
class JobRecord:
    id: str
    job: str
    kind: str
    tenant: str = ""
    host: str = ""
    trigger: str = "manual"  # manual | schedule
    status: str = "queued"  # queued | running | ok | warning | failed
    scheduled_for_ns: int | None = None
    queued_ns: int | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    queue_reason: str = ""
    queued_seconds: float = 0.0
    physical_host: str = ""
    datastores: list[str] = field(default_factory=list)
    snapshot: str | None = None
    bytes_total: int = 0  # logical size of what was backed up
    bytes_read: int = 0
    bytes_new: int = 0
    bytes_stored: int = 0
    files: int = 0
    dedup_ratio: float | None = None
    compression_ratio: float | None = None
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    skipped_count: int = 0
    consistency: str = ""
    error: str = ""
    exit_code: int | None = None
    pid: int | None = None  # the process running it (to tell a crashed run from a running one)

    @property
    def duration(self) -> float | None:
        if self.start_ns is None or self.end_ns is None:
            return None
        return (self.end_ns - self.start_ns) / 1e9

    def to_obj(self) -> dict[str, Any]:
        d = asdict(self)
        d["duration"] = self.duration
        return d

    @classmethod
    def from_obj(cls, o: Mapping[str, Any]) -> JobRecord:
        known = {k: v for k, v in o.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class _JsonLines:
    """Append-only JSON lines with flock and fsync; ``fold`` keeps the last line per id."""

    def __init__(self, path: str) -> None:
        self.path = path

    def append(self, obj: Mapping[str, Any]) -> None:
        line = (json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str) + "\n").encode()
        with locked_append(self.path) as fd:
            os.write(fd, line)
            os.fsync(fd)

    def lines(self) -> Iterator[dict[str, Any]]:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return
        with f:
            for raw in f:
                try:
                    yield json.loads(raw)
                except ValueError:
                    continue  # a line torn by a crash mid-write: the previous state of that id stands

    def fold(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for o in self.lines():
            if "id" in o:
                out[o["id"]] = o
        return out


class JobStore:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        self._f = _JsonLines(os.path.join(directory, "jobs.jsonl"))

    def put(self, rec: JobRecord) -> JobRecord:
        self._f.append(rec.to_obj())
        return rec

    def get(self, rid: str) -> JobRecord | None:
        o = self._f.fold().get(rid)
        return JobRecord.from_obj(o) if o else None

    def all(self) -> list[JobRecord]:
        recs = [JobRecord.from_obj(o) for o in self._f.fold().values()]
        recs.sort(key=lambda r: (r.start_ns or r.queued_ns or 0, r.id))
        return recs

    def query(self, tenant: str | None = None, since_ns: int | None = None, job: str | None = None) -> list[JobRecord]:
        return [r for r in self.all()
                if (tenant is None or r.tenant == tenant) and (job is None or r.job == job)
                and (since_ns is None or (r.start_ns or r.queued_ns or 0) >= since_ns)]

    def last_good(self, job: str) -> JobRecord | None:
        good = [r for r in self.all() if r.job == job and r.status in GOOD and r.end_ns]
        return max(good, key=lambda r: r.end_ns or 0, default=None)

    def last_scheduled(self, job: str) -> int | None:
        """The newest firing that was started or is still waiting (a run that never started does not
        count, so it is tried again)."""
        v = [r.scheduled_for_ns for r in self.all() if r.job == job and r.scheduled_for_ns
             and (r.start_ns is not None or r.status in ("queued", "running"))]
        return max(v, default=None)

    def active(self) -> list[JobRecord]:
        return [r for r in self.all() if r.status in ("queued", "running")]


@dataclass
class Alert:
    id: str
    kind: str  # rpo-missed | job-failed
    job: str
    tenant: str
    message: str
    raised_ns: int
    resolved_ns: int | None = None
    host: str = ""
    record: str = ""  # the job record that raised it (job-failed) or resolved it

    def to_obj(self) -> dict[str, Any]:
        return asdict(self)


# Called with ("raised" | "resolved", alert) once per transition; appliance.notify delivers it.
AlertHook = Callable[[str, Alert], None]


class AlertStore:
    """Open and resolved alerts. An alert is raised once per breach and resolved once, and only those two
    transitions are notified (``alert_hook``), so a job failing at every tick pages once."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self._f = _JsonLines(os.path.join(directory, "alerts.jsonl"))

    def put(self, a: Alert) -> Alert:
        self._f.append(a.to_obj())
        return a

    def all(self) -> list[Alert]:
        known = Alert.__dataclass_fields__
        return sorted((Alert(**{k: v for k, v in o.items() if k in known}) for o in self._f.fold().values()),
                      key=lambda a: a.raised_ns)

    def open_for(self, job: str, kind: str) -> Alert | None:
        return next((a for a in self.all() if a.job == job and a.kind == kind and a.resolved_ns is None), None)

    def _transition(self) -> contextlib.AbstractContextManager[None]:
        """Check-then-write under one lock: a scheduler pass and a backup process finishing at the same
        moment never raise (or resolve) the same alert twice."""
        return exclusive(os.path.join(self.dir, "alerts.lock"))

    def raise_once(self, a: Alert) -> Alert | None:
        """Store ``a`` unless an alert of its kind is already open for its job; the new alert or None."""
        with self._transition():
            if self.open_for(a.job, a.kind) is not None:
                return None
            return self.put(a)

    def resolve(self, job: str, kind: str, now_ns: int, record: str = "") -> Alert | None:
        """Resolve the open alert of this kind for this job, if any; the resolved alert or None."""
        with self._transition():
            a = self.open_for(job, kind)
            if a is None:
                return None
            return self.put(replace(a, resolved_ns=now_ns, record=record or a.record))


def job_finished(rec: JobRecord, alerts: AlertStore, hook: AlertHook | None, now_ns: int) -> Alert | None:
    """A record reached its final status: a failure raises a ``job-failed`` alert (unless one is already
    open for the job), a good run resolves it. The hook hears each transition once."""
    if rec.status == "failed":
        what = f"job {rec.job} failed" + (f" on {rec.host}" if rec.host else "") + (f": {rec.error}" if rec.error else "")
        a = alerts.raise_once(Alert(uuid.uuid4().hex[:16], "job-failed", rec.job, rec.tenant, what, now_ns,
                                    host=rec.host, record=rec.id))
        phase = "raised"
    elif rec.status in GOOD:
        a = alerts.resolve(rec.job, "job-failed", now_ns, rec.id)
        phase = "resolved"
    else:
        return None
    if a is not None and hook is not None:
        _call_hook(hook, phase, a)
    return a


def _call_hook(hook: AlertHook, phase: str, a: Alert) -> None:
    try:
        hook(phase, a)
    except Exception as e:  # noqa: BLE001 - a notification never fails the job
        log.warning("notification for alert %s (%s) failed: %s", a.id, a.job, e)


def alert_hook(cfg: Config | None, directory: str) -> AlertHook | None:
    """The configured notifier (``[notify]``) as an alert hook, or None when nothing is configured."""
    if cfg is None or not cfg.raw.get("notify"):
        return None
    from appliance import notify

    try:
        notifier = notify.Notifier.from_config(cfg.raw, directory)
    except InvalidArgument as e:
        log.warning("notifications are not sent: %s", e)
        return None
    if notifier is None:
        return None
    store = JobStore(directory)

    def hook(phase: str, a: Alert) -> None:
        rec = store.get(a.record) if a.record else None
        details: dict[str, Any] = {"alert raised": _iso(a.raised_ns)}
        if rec is not None:
            details.update(record=rec.id, status=rec.status, snapshot=rec.snapshot, exit_code=rec.exit_code,
                           error=rec.error)
        if phase == "resolved":
            kind = "recovered"
            message = (f"job {a.job} succeeded again" if a.kind == "job-failed"
                       else f"job {a.job} is within its RPO again") + f" (alert raised {_iso(a.raised_ns)}: {a.message})"
            details["resolves"] = a.kind
        else:
            kind, message = a.kind, a.message
        notifier.send(notify.Event(kind, a.job, message, a.resolved_ns or a.raised_ns, tenant=a.tenant,
                                   host=a.host or (rec.host if rec else ""), alert=a.id, details=details))

    return hook


def _iso(t_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t_ns / 1e9))


class SeenStore:
    """When each configured job was first seen (a job that never succeeded is judged from then)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "seen.json")

    def load(self) -> dict[str, int]:
        try:
            with open(self.path) as f:
                return {str(k): int(v) for k, v in json.load(f).items()}
        except (FileNotFoundError, ValueError):
            return {}

    def first_seen(self, names: Iterable[str], now_ns: int) -> dict[str, int]:
        seen = self.load()
        missing = [n for n in names if n not in seen]
        if missing:
            seen.update({n: now_ns for n in missing})
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(seen, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return seen


# --- RPO -------------------------------------------------------------------------------------------------
def rpo_deadline(spec: JobSpec, last_good_ns: int | None, first_seen_ns: int) -> int | None:
    if spec.rpo is None:
        return None
    base = last_good_ns if last_good_ns is not None else first_seen_ns
    start = _dt.datetime.fromtimestamp(base / 1e9, tz=_dt.UTC)
    # deadline = base + rpo: invert Duration.before by stepping forward
    span = start - spec.rpo.before(start)
    return base + int(span.total_seconds() * 1e9)


def last_good_time(spec: JobSpec, store: JobStore, snapshot_times: Mapping[str, int] | None = None) -> int | None:
    """The end of the last good run, or the newest restore point of the job's host/VM (agents push theirs)."""
    rec = store.last_good(spec.name)
    t = rec.end_ns if rec else None
    if snapshot_times and spec.host in snapshot_times:
        t = max(t or 0, snapshot_times[spec.host])
    return t


def evaluate_rpo(specs: Sequence[JobSpec], store: JobStore, alerts: AlertStore, seen: SeenStore, now_ns: int,
                 snapshot_times: Mapping[str, int] | None = None, hook: AlertHook | None = None) -> list[Alert]:
    """Raise one ``rpo-missed`` alert per breach, resolve it when the job is back within its RPO.
    ``snapshot_times``: host/VM -> newest restore point time, so agent jobs count what they pushed.
    ``hook`` hears each raise and each resolution once (notifications)."""
    first = seen.first_seen([s.name for s in specs], now_ns)
    raised = []
    for spec in specs:
        if spec.rpo is None:
            continue
        last = last_good_time(spec, store, snapshot_times)
        deadline = rpo_deadline(spec, last, first[spec.name])
        assert deadline is not None
        open_alert = alerts.open_for(spec.name, "rpo-missed")
        if now_ns > deadline and open_alert is None:
            age = (now_ns - (last or first[spec.name])) / 3.6e12
            what = f"last good restore point {age:.1f} h ago" if last else f"no good run in {age:.1f} h since configured"
            a = alerts.raise_once(Alert(uuid.uuid4().hex[:16], "rpo-missed", spec.name, spec.tenant,
                                        f"job {spec.name} missed its RPO of {spec.rpo}: {what}", now_ns,
                                        host=spec.host))
            if a is not None:
                raised.append(a)
                if hook is not None:
                    _call_hook(hook, "raised", a)
        elif now_ns <= deadline and open_alert is not None:
            a = alerts.resolve(spec.name, "rpo-missed", now_ns)
            if a is not None and hook is not None:
                _call_hook(hook, "resolved", a)
    return raised


# --- due runs --------------------------------------------------------------------------------------------
def due_runs(specs: Sequence[JobSpec], store: JobStore, now: _dt.datetime) -> list[tuple[JobSpec, int]]:
    """(spec, scheduled time) for every appliance-run job whose schedule fired since its last scheduled
    run and that has no run queued or running. Several missed firings give one run, not a backlog."""
    active = {r.job for r in store.active()}
    out = []
    for spec in specs:
        if spec.kind not in RUNNABLE or spec.schedule is None or spec.name in active:
            continue
        fire = spec.schedule.prev_at_or_before(now)
        fire_ns = int(fire.timestamp() * 1e9)
        last = store.last_scheduled(spec.name)
        if last is None or fire_ns > last:
            out.append((spec, fire_ns))
    return out


# --- the hook for backup commands ------------------------------------------------------------------------
class JobRun:
    """Handed to the body of ``recorded_job``; fill it from the restore point."""

    def __init__(self, store: JobStore, rec: JobRecord) -> None:
        self.store = store
        self.rec = rec

    def finish_snapshot(self, snap: Any, warnings: Iterable[str] = ()) -> None:
        """Take sizes, ratios, skipped files and consistency from a committed restore point."""
        fill_record(self.rec, snap.id, snap.kind, snap.stats, snap.errors,
                    snap.meta.get("consistency"), snap.vm, warnings)


def fill_record(r: JobRecord, sid: str, kind: str, stats: Mapping[str, Any], errors: Sequence[Mapping[str, str]],
                consistency: str | None, vm: str | None = None, warnings: Iterable[str] = ()) -> None:
    r.snapshot = sid
    r.bytes_total = int(stats.get("bytes", 0))
    r.bytes_read = int(stats.get("read_bytes", stats.get("bytes", 0)))
    r.bytes_new = int(stats.get("new_bytes", 0))
    r.bytes_stored = int(stats.get("stored_bytes", 0))
    r.files = int(stats.get("files", 0))
    r.dedup_ratio = round(r.bytes_total / r.bytes_new, 2) if r.bytes_new else None
    r.compression_ratio = round(r.bytes_new / r.bytes_stored, 2) if r.bytes_stored else None
    r.skipped_count = len(errors)
    r.skipped = [dict(e) for e in errors[:MAX_SKIPPED_KEPT]]
    r.warnings.extend(warnings)
    if errors:
        r.warnings.append(f"{len(errors)} files could not be read and were skipped")
    r.consistency = str(consistency or ("file-level" if kind == "files" else "unknown"))
    if kind == "image" and not r.host:
        r.host = vm or ""


def agent_runs(snaps: Iterable[Any], recorded: set[str]) -> list[JobRecord]:
    """Restore points pushed by network agents, which leave no job record on the appliance, as runs of
    the job ``agent:HOST`` (``recorded``: snapshot ids some record already names)."""
    out = []
    for s in snaps:
        if s.id in recorded or s.meta.get("source") != "agent":
            continue
        dur = float(s.stats.get("duration", 0) or 0)
        r = JobRecord(id=s.id[:16], job=f"agent:{s.host}", kind="agent", tenant=str(s.meta.get("tenant", "")),
                      host=s.host, trigger="agent", start_ns=s.time_ns, end_ns=s.time_ns + int(dur * 1e9))
        fill_record(r, s.id, s.kind, s.stats, s.errors, s.meta.get("consistency"), s.vm)
        r.status = "warning" if r.skipped_count else "ok"
        out.append(r)
    return out


def fill_from_output(r: JobRecord, output: bytes, code: int, end_ns: int) -> None:
    """Complete a record from a backup command's ``--json`` output when the command itself did not
    (commands wrapped in ``recorded_job`` record themselves; this covers any other command)."""
    text = output.decode(errors="replace")
    objs: list[Any] = []
    try:
        objs = [json.loads(text)]
    except ValueError:
        for ln in text.splitlines():
            try:
                objs.append(json.loads(ln))
            except ValueError:
                continue
    r.end_ns, r.exit_code = end_ns, code
    summary = next((o for o in objs if isinstance(o, dict) and o.get("message_type") == "summary"), None)
    err = next((o for o in objs if isinstance(o, dict) and o.get("message_type") == "exit_error"), None)
    if summary is not None:
        fill_record(r, str(summary.get("id", "")), str(summary.get("kind", "files")), summary.get("stats") or {},
                    summary.get("skipped") or [], summary.get("consistency"), summary.get("vm"))
    if err is not None:
        r.error = str(err.get("message", ""))
    if code == 0 or (code == 1 and summary is not None):
        r.status = "warning" if r.warnings or r.skipped_count else "ok"
    else:
        r.status = "failed"
        r.error = r.error or f"the backup command exited with status {code}"


@contextlib.contextmanager
def recorded_job(kind: str, host: str, tenant: str = "", job: str | None = None,
                 cfg: Config | None = None, clock: Callable[[], int] = time.time_ns) -> Iterator[JobRun]:
    """Record one backup run: ``running`` on entry, then ``ok``/``warning`` or ``failed`` (with the
    error) on exit; exceptions propagate unchanged. If ``IHB_JOB_RECORD`` names a queued record (set by
    ``ihb jobs run-due``), that record is completed instead of a new one being made."""
    try:
        store: JobStore | None = JobStore(state_dir(cfg))
    except OSError as e:
        log.warning("job records cannot be written (%s); the backup runs unrecorded", e)
        store = None
    rid = os.environ.get("IHB_JOB_RECORD")
    rec = store.get(rid) if store is not None and rid else None
    now = clock()
    if rec is None:
        rec = JobRecord(id=uuid.uuid4().hex[:16], job=job or f"{kind}:{host}", kind=kind, tenant=tenant, host=host,
                        queued_ns=now)
    rec.status, rec.start_ns, rec.pid = "running", now, os.getpid()
    if rec.queued_ns:
        rec.queued_seconds = round((now - rec.queued_ns) / 1e9, 3)

    def put() -> None:
        if store is None:
            return
        try:
            store.put(rec)
        except OSError as e:  # never fail a backup because its record cannot be written
            log.warning("job record %s not written: %s", rec.id, e)

    def finished() -> None:
        put()
        if store is None:
            return
        try:
            job_finished(rec, AlertStore(store.dir), alert_hook(cfg, store.dir), clock())
        except OSError as e:
            log.warning("alert for job record %s not written: %s", rec.id, e)

    put()
    run = JobRun(store, rec)  # type: ignore[arg-type]
    try:
        yield run
    except BaseException as e:
        rec.end_ns = clock()
        rec.status = "failed"
        rec.error = str(e) or type(e).__name__
        rec.exit_code = getattr(e, "exit_code", None) or (e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else None)
        if isinstance(e, SystemExit) and e.code in (0, None):
            rec.status, rec.error = "ok", ""
        finished()
        raise
    rec.end_ns = clock()
    rec.status = "warning" if rec.warnings or rec.skipped_count else "ok"
    finished()


def new_queued(spec: JobSpec, scheduled_for_ns: int, now_ns: int) -> JobRecord:
    return JobRecord(id=uuid.uuid4().hex[:16], job=spec.name, kind=spec.kind, tenant=spec.tenant, host=spec.host,
                     trigger="schedule", status="queued", scheduled_for_ns=scheduled_for_ns, queued_ns=now_ns,
                     physical_host=spec.physical_host, datastores=list(spec.datastores))


# --- one scheduler pass: `ihb jobs run-due` --------------------------------------------------------------
Placement = Callable[[JobSpec], tuple[str, tuple[str, ...]]]


def spec_placement(spec: JobSpec) -> tuple[str, tuple[str, ...]]:
    """Physical host and datastores of a job: the config's where given, else, for VM jobs, asked of the
    hypervisor connection (appliance/hypervisor/placement.py); a VM that does not answer is placed by
    the config alone (its backup will report why it failed)."""
    host, stores = spec.physical_host, spec.datastores
    if spec.kind == "vm" and spec.source and not (host and stores):
        from appliance.hypervisor.placement import vm_placement
        from appliance.hypervisor.qmp import QMPError
        from repo.errors import IhbError

        try:
            qhost, qstores = vm_placement(spec.source)
            host, stores = host or qhost, stores or qstores
        except (IhbError, OSError, QMPError) as e:
            log.info("job %s: placement not known from QMP (%s); using the config's", spec.name, e)
    return host, stores


@dataclass
class RunDueResult:
    due: list[JobRecord] = field(default_factory=list)
    finished: list[JobRecord] = field(default_factory=list)
    queue_events: list[tuple[str, str]] = field(default_factory=list)  # (job, reason) each time it waited
    alerts: list[Alert] = field(default_factory=list)
    max_running: int = 0


def run_due(cfg: Config, spawn: Callable[[JobSpec, JobRecord], Any], *, now: Callable[[], int] = time.time_ns,
            poll: float = 0.2, dry_run: bool = False, placement: Placement = spec_placement,
            snapshot_times: Mapping[str, int] | None = None) -> RunDueResult:
    """Queue every due job, start them as the caps allow (``spawn`` returns a handle with ``poll()``,
    e.g. a ``subprocess.Popen`` of ``ihb backup`` with ``IHB_JOB_RECORD`` set), record each wait in the
    job record, wait until all are done, then evaluate every job's RPO."""
    specs = load_specs(cfg)
    caps = Caps.from_config(cfg)
    d = state_dir(cfg)
    store, alerts, seen = JobStore(d), AlertStore(d), SeenStore(d)
    result = RunDueResult()
    hook = None if dry_run else alert_hook(cfg, d)
    with _scheduler_lock(d):
        if not dry_run:
            _close_orphans(store, now(), alerts, hook)
        return _run_due_locked(specs, caps, store, alerts, seen, result, spawn, now, poll, dry_run, placement,
                               snapshot_times, hook)


@contextlib.contextmanager
def _scheduler_lock(directory: str) -> Iterator[None]:
    """One scheduler pass at a time (a timer firing while the previous pass still runs backs off)."""
    fd = os.open(os.path.join(directory, "run-due.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidArgument("another `ihb jobs run-due` is still running; this pass is skipped") from None
        yield
    finally:
        os.close(fd)


def _close_orphans(store: JobStore, now_ns: int, alerts: AlertStore | None = None,
                   hook: AlertHook | None = None) -> None:
    """Records a dead scheduler pass or a killed backup left queued or running, marked failed, so that the
    job becomes due again and the report says what happened."""
    from repo.sessions import process_start

    for r in store.active():
        if r.status == "queued":
            r.error = "the scheduler stopped before starting this run"
        elif r.pid is not None and process_start(r.pid) is None:
            r.error = "the backup process ended without recording a result (killed?)"
        else:
            continue
        r.status, r.end_ns = "failed", now_ns
        store.put(r)
        if alerts is not None:
            job_finished(r, alerts, hook, now_ns)


def _run_due_locked(specs: Sequence[JobSpec], caps: Caps, store: JobStore, alerts: AlertStore, seen: SeenStore,
                    result: RunDueResult, spawn: Callable[[JobSpec, JobRecord], Any], now: Callable[[], int],
                    poll: float, dry_run: bool, placement: Placement,
                    snapshot_times: Mapping[str, int] | None, hook: AlertHook | None = None) -> RunDueResult:
    t = now()
    first = seen.first_seen([s.name for s in specs], t)
    waiting: dict[str, tuple[JobSpec, JobRecord, Candidate]] = {}
    for spec, fire_ns in due_runs(specs, store, _dt.datetime.fromtimestamp(t / 1e9, tz=_dt.UTC)):
        host, ds = placement(spec)
        rec = new_queued(spec, fire_ns, t)
        rec.physical_host, rec.datastores = host, list(ds)
        last = last_good_time(spec, store, snapshot_times)
        cand = Candidate(spec.name, fire_ns, host, ds, rpo_deadline(spec, last, first.get(spec.name, t)))
        if not dry_run:
            store.put(rec)
        waiting[rec.id] = (spec, rec, cand)
        result.due.append(rec)
    if dry_run:
        dec = schedule([c for _s, _r, c in waiting.values()], [], caps, t)
        result.queue_events = [(c.job, r) for c, r in dec.queued]
        return result
    running: dict[str, tuple[Any, JobSpec, JobRecord, Candidate]] = {}
    cand_start: dict[str, int] = {}
    while waiting or running:
        dec = schedule([c for _s, _r, c in waiting.values()],
                       [RunningJob(c.job, c.physical_host, c.datastores) for _h, _s, _r, c in running.values()],
                       caps, now())
        by_job = {r.job: rid for rid, (_s, r, _c) in waiting.items()}
        for c in dec.start:
            rid = by_job[c.job]
            spec, rec, cand = waiting.pop(rid)
            t_start = now()
            cand_start[rid] = t_start
            rec.queued_seconds = round((t_start - (rec.queued_ns or t_start)) / 1e9, 3)
            store.put(rec)
            running[rid] = (spawn(spec, rec), spec, rec, cand)
        for c, reason in dec.queued:
            rid = by_job[c.job]
            _spec, rec, _cand = waiting[rid]
            if rec.queue_reason != reason:
                rec.queue_reason = reason
                store.put(rec)
                result.queue_events.append((c.job, reason))
        result.max_running = max(result.max_running, len(running))
        time.sleep(poll)
        for rid in list(running):
            handle, spec, rec, _cand = running[rid]
            code = handle.poll()
            if code is None:
                continue
            del running[rid]
            final = store.get(rid) or rec
            if final.status in ("queued", "running"):  # the command did not record its end itself
                out = handle.output() if hasattr(handle, "output") else b""
                if final.start_ns is None:
                    final.start_ns = cand_start.get(rid)
                fill_from_output(final, out, code, now())
                store.put(final)
                job_finished(final, alerts, hook, now())  # a command that records itself did this already
            result.finished.append(final)
    result.alerts = evaluate_rpo(specs, store, alerts, seen, now(), snapshot_times, hook)
    return result
