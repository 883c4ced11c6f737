"""Retention policy: golden cases (regenerate with IHB_REGEN_GOLDEN=1, then review the diff) and
hand-checked properties of restic's semantics."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from repo.errors import InvalidArgument
from repo.retention import Duration, Policy, apply_policy, parse_duration
from repo.snapshot import Snapshot

GOLDEN = Path(__file__).parent / "golden"
UTC = dt.UTC
NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
REGEN = os.environ.get("IHB_REGEN_GOLDEN") == "1"  # read at import: the clean_env fixture drops IHB_*


def _snap(host: str, t: dt.datetime, n: int, vm: str | None = None, tenant: str = "acme",
          locked_until: int | None = None) -> Snapshot:
    meta: dict[str, object] = {"tenant": tenant}
    if vm:
        meta["vm"] = vm
    if locked_until:
        meta["locked_until"] = locked_until
    return Snapshot(id=f"{host}-{n:05d}".ljust(64, "0"), kind="image" if vm else "files", host=host,
                    time_ns=int(t.timestamp() * 1e9), paths=[] if vm else ["/srv"], meta=meta)


def series() -> list[Snapshot]:
    """web1: every 12 h (00:15 and 12:15) from 2024-01-01 to the end of Feb 2025, plus a burst of three
    within one hour on 2025-02-27; vm1 (an image): daily at 03:00 for 60 days; beta/web1 (another
    tenant, same host name): 5 snapshots."""
    out = []
    t = dt.datetime(2024, 1, 1, 0, 15, tzinfo=UTC)
    n = 0
    while t < dt.datetime(2025, 3, 1, tzinfo=UTC):
        out.append(_snap("web1", t, n))
        n += 1
        t += dt.timedelta(hours=12)
    for m in (20, 35, 50):
        out.append(_snap("web1", dt.datetime(2025, 2, 27, 9, m, tzinfo=UTC), n))
        n += 1
    for d in range(60):
        out.append(_snap("appliance", dt.datetime(2025, 1, 1, 3, 0, tzinfo=UTC) + dt.timedelta(days=d), d, vm="vm1"))
    for d in range(5):
        out.append(_snap("web1", dt.datetime(2025, 2, 1, 1, 0, tzinfo=UTC) + dt.timedelta(days=d * 3), 900 + d,
                         tenant="beta"))
    return out


CASES: dict[str, tuple[Policy, dict[str, int]]] = {
    "last3": (Policy(last=3), {}),
    "daily7": (Policy(daily=7), {}),
    "hdwmy": (Policy(hourly=24, daily=7, weekly=4, monthly=12, yearly=2), {}),
    "within10d": (Policy(within=Duration(days=10)), {}),
    "within1m_last2": (Policy(last=2, within=Duration(months=1)), {}),
    "daily_all": (Policy(daily=-1), {}),
    "monthly100_oldest": (Policy(monthly=100), {}),
    "weekly60_yearend": (Policy(weekly=60), {}),
    "last1_locks": (Policy(last=1), {"web1-00010": int(dt.datetime(2025, 6, 1, tzinfo=UTC).timestamp() * 1e9),
                                     "web1-00011": int(dt.datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1e9)}),
}


def _run(policy: Policy, locks: dict[str, int]) -> dict[str, object]:
    snaps = series()
    lock_ids = {s.id: locks[s.id[:10]] for s in snaps if s.id[:10] in locks}
    keep, remove, reasons = apply_policy(snaps, policy, NOW, locks=lock_ids)
    assert {s.id for s in keep} | {s.id for s in remove} == {s.id for s in snaps}
    assert not {s.id for s in keep} & {s.id for s in remove}
    return {"policy": policy.to_obj(), "now": NOW.isoformat(),
            "keep": {s.id[: s.id.index("-") + 6] + f" {s.time:%Y-%m-%d %H:%M}": reasons[s.id].matches for s in keep},
            "remove_count": len(remove)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    policy, locks = CASES[case]
    got = _run(policy, locks)
    path = GOLDEN / f"retention_{case}.json"
    if REGEN:
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert got == want, f"{case}: the policy result changed; review and regenerate with IHB_REGEN_GOLDEN=1"


def _kept(policy: Policy, snaps: list[Snapshot], now: dt.datetime = NOW, **kw: object) -> list[Snapshot]:
    keep, _remove, _ = apply_policy(snaps, policy, now, **kw)  # type: ignore[arg-type]
    return keep


def test_last_is_per_group() -> None:
    keep = _kept(Policy(last=3), series())
    by_group: dict[tuple[str, str | None, str], int] = {}
    for s in keep:
        k = (s.host, s.vm, str(s.meta["tenant"]))
        by_group[k] = by_group.get(k, 0) + 1
    assert by_group == {("web1", None, "acme"): 3, ("appliance", "vm1", "acme"): 3, ("web1", None, "beta"): 3}


def test_daily_keeps_newest_of_each_day() -> None:
    web = [s for s in series() if s.host == "web1" and s.meta["tenant"] == "acme"]
    keep = _kept(Policy(daily=7), web)
    days = [s.time.strftime("%Y-%m-%d %H:%M") for s in keep]
    assert days == ["2025-02-28 12:15", "2025-02-27 12:15", "2025-02-26 12:15", "2025-02-25 12:15",
                    "2025-02-24 12:15", "2025-02-23 12:15", "2025-02-22 12:15"]


def test_oldest_is_kept_while_counts_remain() -> None:
    web = [s for s in series() if s.host == "web1" and s.meta["tenant"] == "acme"]
    keep, _r, reasons = apply_policy(web, Policy(monthly=100), NOW)
    assert len(keep) == 14 + 1  # 14 months (2024-01 .. 2025-02) and the very first restore point
    oldest = min(web, key=lambda s: s.time_ns)
    assert reasons[oldest.id].matches == ["oldest monthly"]


def test_within_is_relative_to_newest_not_now() -> None:
    web = [s for s in series() if s.host == "web1" and s.meta["tenant"] == "acme"]
    later = dt.datetime(2026, 3, 1, tzinfo=UTC)  # a year without backups: nothing is emptied
    keep = _kept(Policy(within=Duration(days=2)), web, later)
    assert [s.time.strftime("%m-%d %H:%M") for s in keep] == ["02-28 12:15", "02-28 00:15", "02-27 12:15",
                                                                 "02-27 09:50", "02-27 09:35", "02-27 09:20",
                                                                 "02-27 00:15"]


def test_locks_always_kept_and_expire() -> None:
    web = [s for s in series() if s.host == "web1" and s.meta["tenant"] == "acme"][:20]
    future = int(dt.datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1e9)
    past = int(dt.datetime(2024, 6, 1, tzinfo=UTC).timestamp() * 1e9)
    web[3] = _snap("web1", web[3].time, 3, locked_until=future)
    web[4] = _snap("web1", web[4].time, 4, locked_until=past)
    keep, _r, reasons = apply_policy(web, Policy(last=1), NOW, locks={web[5].id: future})
    assert {s.id for s in keep} == {web[19].id, web[3].id, web[5].id}
    assert reasons[web[3].id].matches == ["locked until 2026-01-01T00:00:00Z"]


def test_empty_policy_refused_and_durations() -> None:
    with pytest.raises(InvalidArgument):
        apply_policy(series(), Policy(), NOW)
    assert parse_duration("1y6m") == (1, 6, 0, 0)
    assert parse_duration("2w3d12h") == (0, 0, 17, 12)
    with pytest.raises(InvalidArgument):
        parse_duration("7 days")
    assert Duration(months=1).before(dt.datetime(2025, 3, 31, tzinfo=UTC)) == dt.datetime(2025, 2, 28, tzinfo=UTC)


def test_weekly_uses_iso_weeks_across_year_end() -> None:
    snaps = [_snap("h", dt.datetime(2024, 12, 28, tzinfo=UTC) + dt.timedelta(days=d), d) for d in range(8)]
    keep = _kept(Policy(weekly=2), snaps, dt.datetime(2025, 1, 10, tzinfo=UTC))
    # 2024-12-28/29 are ISO week 2024-W52; 2024-12-30 .. 2025-01-04 are 2025-W01
    assert [s.time.strftime("%Y-%m-%d") for s in keep] == ["2025-01-04", "2024-12-29"]
