"""Inline SVG charts drawn on the server: the dashboard needs no script and no chart library.

Pure functions from numbers to markup, so they are tested without a server. Every data point is a
``<circle class="pt">`` with a ``<title>`` (the browser shows it as a tooltip) and ``data-`` attributes
that say which series and run it belongs to.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


@dataclass
class Series:
    name: str
    points: list[tuple[float, float, str]] = field(default_factory=list)  # (unix time, value, tooltip)
    color: str = ""


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 1.0
    while exp * 10 <= v:
        exp *= 10
    while exp > v:
        exp /= 10
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= v:
            return m * exp
    return 10 * exp


def _time_label(t: float, span: float) -> str:
    d = dt.datetime.fromtimestamp(t, tz=dt.UTC)
    return d.strftime("%H:%M:%S" if span < 600 else "%m-%d %H:%M" if span < 4 * 86400 else "%Y-%m-%d")


def time_chart(title: str, series: Sequence[Series], fmt_y: Callable[[float], str], width: int = 720,
               height: int = 220) -> str:
    """Lines with points over time; an empty chart says so instead of drawing axes around nothing."""
    esc = html.escape
    pts = [p for s in series for p in s.points]
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}"><title>{esc(title)}</title>')
    if not pts:
        return head + f'<text x="{width // 2}" y="{height // 2}" text-anchor="middle">no runs yet</text></svg>'
    left, right, top, bottom = 70, 12, 22, 34
    pw, ph = width - left - right, height - top - bottom
    t0, t1 = min(p[0] for p in pts), max(p[0] for p in pts)
    if t1 - t0 < 1:
        t0, t1 = t0 - 30, t1 + 30
    ymax = _nice_max(max(p[1] for p in pts))

    def x(t: float) -> float:
        return left + (t - t0) / (t1 - t0) * pw

    def y(v: float) -> float:
        return top + ph - (v / ymax) * ph

    out = [head, f'<text x="{left}" y="14" class="ct">{esc(title)}</text>']
    for i in range(5):  # horizontal grid with value labels
        v = ymax * i / 4
        yy = y(v)
        out.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{left + pw}" y2="{yy:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 4}" y="{yy + 4:.1f}" text-anchor="end" class="ax">{esc(fmt_y(v))}</text>')
    for i in range(4):  # time ticks
        t = t0 + (t1 - t0) * i / 3
        anchor = "start" if i == 0 else "end" if i == 3 else "middle"
        out.append(f'<text x="{x(t):.1f}" y="{height - 12}" text-anchor="{anchor}" class="ax">'
                   f'{esc(_time_label(t, t1 - t0))}</text>')
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#888"/>')
    lx = left + pw
    for n, s in enumerate(series):
        color = s.color or PALETTE[n % len(PALETTE)]
        ordered = sorted(s.points)
        if len(ordered) > 1:
            line = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v, _ in ordered)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{line}"/>')
        for t, v, tip in ordered:
            out.append(f'<circle class="pt" data-series="{esc(s.name)}" cx="{x(t):.1f}" cy="{y(v):.1f}" r="3.5" '
                       f'fill="{color}"><title>{esc(tip)}</title></circle>')
        lx -= 8 * len(s.name) + 24
        out.append(f'<rect x="{lx}" y="6" width="10" height="10" fill="{color}"/>'
                   f'<text x="{lx + 14}" y="15" class="ax">{esc(s.name)}</text>')
    out.append("</svg>")
    return "".join(out)


def usage_bar(parts: Sequence[tuple[str, float, str]], total: float, width: int = 480, height: int = 26) -> str:
    """One horizontal bar split into labelled, coloured parts of ``total`` (e.g. stored vs saved bytes)."""
    esc = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="bar" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}"><rect width="{width}" height="{height}" fill="#eee"/>']
    x0 = 0.0
    for label, v, color in parts:
        w = 0.0 if total <= 0 else max(0.0, min(width - x0, v / total * width))
        out.append(f'<rect x="{x0:.1f}" width="{w:.1f}" height="{height}" fill="{color}">'
                   f'<title>{esc(label)}</title></rect>')
        x0 += w
    out.append("</svg>")
    return "".join(out)
