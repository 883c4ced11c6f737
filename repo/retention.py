"""Retention policies: which restore points to keep, as a pure function of the list, a policy and a time.

Why pure: prune is destructive, so the decision must be testable with golden cases and shown in full
by ``ihb prune --dry-run`` before anything is deleted (docs STYLE G11; restic ``ApplyPolicy``).

Semantics (restic's, with one difference, ``within``):

* restore points are grouped (by default per tenant, host or VM, and backed-up paths); each group is
  judged on its own, newest first;
* ``last N`` keeps the N newest; ``hourly/daily/weekly/monthly/yearly N`` keeps the newest restore
  point of each of the N most recent hours/days/ISO weeks/months/years *that have one*. -1 = no limit.
  If a rule still has counts left when the oldest restore point is reached, the oldest is kept too
  ("oldest daily"), which maximises the history kept while the rule is not yet full;
* ``within D`` keeps every restore point taken within D of the group's newest restore point that is not
  in the future (restic), so a host that stopped backing up is not emptied by the passing of time;
* a restore point with a retention lock (``locked_until`` in its record, or a lock note, see
  retention_lock.py) later than ``now`` is always kept; locks are not counted by the rules;
* buckets use UTC (an appliance serves hosts in many time zones) unless a ``tz`` is given.

Nothing is kept forever by default: ``DEFAULT_POLICY`` applies when no policy is configured, and an
empty policy is refused rather than read as "remove everything".
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgument
from .snapshot import Snapshot

GROUP_FIELDS = ("tenant", "host", "vm", "paths", "kind")
DEFAULT_GROUP_BY = ("tenant", "host", "vm", "paths")

_DUR = re.compile(r"(\d+)([ymwdh])")


def parse_duration(text: str) -> tuple[int, int, int, int]:
    """``1y2m3d4h`` -> (years, months, days, hours); ``m`` is months, ``w`` weeks (7 days)."""
    s = text.strip().lower()
    pos, years, months, days, hours = 0, 0, 0, 0, 0
    for m in _DUR.finditer(s):
        if m.start() != pos:
            break
        n, u = int(m.group(1)), m.group(2)
        if u == "y":
            years += n
        elif u == "m":
            months += n
        elif u == "w":
            days += 7 * n
        elif u == "d":
            days += n
        else:
            hours += n
        pos = m.end()
    if not s or pos != len(s):
        raise InvalidArgument(f"duration {text!r} is not valid: write it like 12h, 7d, 2w, 6m, 1y or 1y6m")
    return years, months, days, hours


@dataclass(frozen=True)
class Duration:
    """A calendar duration (years and months are calendar months, not 30 days)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> Duration:
        return cls(*parse_duration(text))

    def before(self, t: _dt.datetime) -> _dt.datetime:
        """``t`` minus this duration; the day is clamped at month ends (31 March - 1m = 28/29 February)."""
        month0 = t.month - 1 - self.months - 12 * self.years
        y, m = t.year + month0 // 12, month0 % 12 + 1
        last_day = (_dt.date(y + (m == 12), m % 12 + 1, 1) - _dt.timedelta(days=1)).day
        return t.replace(year=y, month=m, day=min(t.day, last_day)) - _dt.timedelta(days=self.days, hours=self.hours)

    def __str__(self) -> str:
        parts = [f"{v}{u}" for v, u in ((self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h")) if v]
        return "".join(parts) or "0d"

    def is_zero(self) -> bool:
        return not (self.years or self.months or self.days or self.hours)


@dataclass(frozen=True)
class Policy:
    """Counts per rule (0 = rule off, -1 = unlimited) and ``within``."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None

    def empty(self) -> bool:
        return not any((self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly)) and (
            self.within is None or self.within.is_zero())

    def describe(self) -> str:
        rules = [f"{'all' if n == -1 else n} {name}" for name, n in
                 (("last", self.last), ("hourly", self.hourly), ("daily", self.daily), ("weekly", self.weekly),
                  ("monthly", self.monthly), ("yearly", self.yearly)) if n]
        if self.within is not None and not self.within.is_zero():
            rules.append(f"all within {self.within} of the newest")
        return "keep " + ", ".join(rules) if rules else "keep nothing"

    def to_obj(self) -> dict[str, Any]:
        return {"last": self.last, "hourly": self.hourly, "daily": self.daily, "weekly": self.weekly,
                "monthly": self.monthly, "yearly": self.yearly, "within": str(self.within) if self.within else None}

    @classmethod
    def from_obj(cls, o: Mapping[str, Any]) -> Policy:
        unknown = set(o) - {"last", "hourly", "daily", "weekly", "monthly", "yearly", "within"}
        if unknown:
            raise InvalidArgument(f"retention policy: unknown keys {sorted(unknown)}")
        w = o.get("within")
        return cls(*(int(o.get(k, 0)) for k in ("last", "hourly", "daily", "weekly", "monthly", "yearly")),
                   within=Duration.parse(str(w)) if w else None)


# The default when nothing is configured: two weeks of dailies, two months of weeklies, half a year of
# monthlies. Backups are not an archive.
DEFAULT_POLICY = Policy(last=1, daily=14, weekly=8, monthly=6)


@dataclass
class KeepReason:
    snapshot: str
    matches: list[str]
    group: tuple[str, ...]


def _hour(t: _dt.datetime) -> int:
    return ((t.year * 100 + t.month) * 100 + t.day) * 100 + t.hour


def _day(t: _dt.datetime) -> int:
    return (t.year * 100 + t.month) * 100 + t.day


def _week(t: _dt.datetime) -> int:
    y, w, _ = t.isocalendar()
    return y * 100 + w


def _month(t: _dt.datetime) -> int:
    return t.year * 100 + t.month


def _year(t: _dt.datetime) -> int:
    return t.year


_BUCKETS: tuple[tuple[str, Callable[[_dt.datetime], int]], ...] = (
    ("hourly", _hour), ("daily", _day), ("weekly", _week), ("monthly", _month), ("yearly", _year))


def group_key(snap: Snapshot, group_by: Sequence[str] = DEFAULT_GROUP_BY) -> tuple[str, ...]:
    out = []
    for f in group_by:
        if f == "tenant":
            out.append(str(snap.meta.get("tenant", "")))
        elif f == "host":
            out.append(snap.host if snap.kind == "files" else "")
        elif f == "vm":
            out.append(snap.vm or "")
        elif f == "paths":
            out.append("\0".join(sorted(snap.paths)))
        elif f == "kind":
            out.append(snap.kind)
        else:
            raise InvalidArgument(f"cannot group restore points by {f!r}; use {', '.join(GROUP_FIELDS)}")
    return tuple(out)


def meta_lock(snap: Snapshot) -> int:
    """``locked_until`` recorded in the restore point at backup time (ns since the epoch, or 0)."""
    v = snap.meta.get("locked_until")
    if isinstance(v, int | float) and not isinstance(v, bool):
        return int(v) if v > 10**12 else int(v * 1e9)  # accept seconds or ns
    if isinstance(v, str):
        try:
            return int(_dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp() * 1e9)
        except ValueError:
            return 0
    return 0


@dataclass
class RetentionResult:
    keep: list[Snapshot] = field(default_factory=list)
    remove: list[Snapshot] = field(default_factory=list)
    reasons: dict[str, KeepReason] = field(default_factory=dict)


def apply_policy(
    snapshots: Iterable[Snapshot],
    policy: Policy,
    now: _dt.datetime | int,
    *,
    group_by: Sequence[str] = DEFAULT_GROUP_BY,
    locks: Mapping[str, int] | None = None,
    tz: _dt.tzinfo = _dt.UTC,
) -> tuple[list[Snapshot], list[Snapshot], dict[str, KeepReason]]:
    """Split ``snapshots`` into (keep, remove, reasons per kept snapshot id); both lists newest first.

    ``now`` (datetime or ns) decides which locks still hold and which restore points lie in the future;
    ``locks`` maps snapshot id to lock expiry in ns (lock notes), on top of ``locked_until`` in records.
    """
    if policy.empty():
        raise InvalidArgument("the retention policy keeps nothing; give at least one --keep-* rule")
    now_ns = now if isinstance(now, int) else int(now.timestamp() * 1e9)
    locks = locks or {}
    groups: dict[tuple[str, ...], list[Snapshot]] = {}
    for s in snapshots:
        groups.setdefault(group_key(s, group_by), []).append(s)
    result = RetentionResult()
    for key in sorted(groups):
        _apply_group(sorted(groups[key], key=lambda s: (s.time_ns, s.id), reverse=True), policy, now_ns, key,
                     locks, tz, result)
    result.keep.sort(key=lambda s: (s.time_ns, s.id), reverse=True)
    result.remove.sort(key=lambda s: (s.time_ns, s.id), reverse=True)
    return result.keep, result.remove, result.reasons


def _apply_group(snaps: list[Snapshot], p: Policy, now_ns: int, key: tuple[str, ...], locks: Mapping[str, int],
                 tz: _dt.tzinfo, out: RetentionResult) -> None:
    counts = {"last": p.last, "hourly": p.hourly, "daily": p.daily, "weekly": p.weekly, "monthly": p.monthly,
              "yearly": p.yearly}
    seen: dict[str, int | None] = {k: None for k in counts}
    newest = next((s.time_ns for s in snaps if s.time_ns <= now_ns), None)
    within_from = None
    if p.within is not None and not p.within.is_zero() and newest is not None:
        within_from = p.within.before(_dt.datetime.fromtimestamp(newest / 1e9, tz=_dt.UTC))
    for i, s in enumerate(snaps):
        oldest = i == len(snaps) - 1
        t = _dt.datetime.fromtimestamp(s.time_ns / 1e9, tz=tz)
        why: list[str] = []
        lock = max(meta_lock(s), locks.get(s.id, 0))
        if lock > now_ns:
            until = _dt.datetime.fromtimestamp(lock / 1e9, tz=_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            why.append(f"locked until {until}")
        if within_from is not None and t > within_from:
            why.append(f"within {p.within}")
        for name, fn in (("last", lambda _t, i=i: i), *_BUCKETS):
            if counts[name] == 0:
                continue
            val = fn(t)
            if val != seen[name]:
                why.append(f"{name}" if name != "last" else "last")
            elif oldest:
                why.append(f"oldest {name}")
            else:
                continue
            seen[name] = val
            if counts[name] > 0:
                counts[name] -= 1
        if why:
            out.keep.append(s)
            out.reasons[s.id] = KeepReason(s.id, why, key)
        else:
            out.remove.append(s)


def explain(keep: list[Snapshot], remove: list[Snapshot], reasons: Mapping[str, KeepReason]) -> list[dict[str, Any]]:
    """One row per restore point for `ihb prune --dry-run` and the API: id, time, group, action, why."""
    rows = []
    for s in sorted([*keep, *remove], key=lambda s: (s.time_ns, s.id), reverse=True):
        r = reasons.get(s.id)
        rows.append({"id": s.id, "short_id": s.short_id, "time": s.time.isoformat().replace("+00:00", "Z"),
                     "host": s.vm or s.host, "tenant": s.meta.get("tenant"), "action": "keep" if r else "remove",
                     "reasons": r.matches if r else []})
    return rows
