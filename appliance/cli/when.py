"""Dates on the command line: ``2026-11-01``, ``2026-11-01T12:30`` (UTC unless an offset is given), or a
duration relative to now (``7d``, ``12h``, ``1y6m``: ago for --since, ahead for --until)."""

from __future__ import annotations

import datetime as dt

from repo.errors import InvalidArgument
from repo.retention import Duration


def parse_when(text: str, *, future: bool = False, now: dt.datetime | None = None) -> dt.datetime:
    now = now or dt.datetime.now(dt.UTC)
    s = text.strip()
    if s in ("now", "today"):
        return now if s == "now" else now.replace(hour=0, minute=0, second=0, microsecond=0)
    rel = s[1:] if s[:1] in "+-" else s
    if rel and rel[0].isdigit() and rel[-1].isalpha():
        d = Duration.parse(rel)
        if future:
            span = now - d.before(now)
            return now + span
        return d.before(now)
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(f"{text!r} is not a date: use 2026-11-01, 2026-11-01T12:30 or a duration like 7d") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def ns(t: dt.datetime) -> int:
    return int(t.timestamp() * 1e9)


def iso(ns_: int | None) -> str:
    if not ns_:
        return "-"
    return dt.datetime.fromtimestamp(ns_ / 1e9, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
