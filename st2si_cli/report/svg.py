"""Small inline SVG charts (line and bar), written as text: no plotting library, no external resource.

Every string that reaches the SVG is escaped; numbers are formatted here. Axes can be logarithmic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f")
MARGIN = {"left": 54, "right": 14, "top": 28, "bottom": 40}


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 10000:
        return f"{x / 1000:.0f}k"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 1:
        return f"{x:.3g}"
    return f"{x:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * step:
            step *= m
            break
    start = math.ceil(lo / step) * step
    out, x = [], start
    while x <= hi + step * 1e-9:
        out.append(round(x, 12))
        x += step
    return out


def _log_ticks(lo: float, hi: float) -> list[float]:
    return [10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]


class _Axis:
    def __init__(self, lo: float, hi: float, a: float, b: float, log: bool):
        self.log = log and lo > 0
        if self.log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi <= lo:
            pad = abs(lo) * 0.05 or 0.5
            lo, hi = lo - pad, hi + pad
        self.lo, self.hi, self.a, self.b = lo, hi, a, b

    def __call__(self, v: float) -> float:
        if self.log:
            v = math.log10(max(v, 10**self.lo))
        return self.a + (v - self.lo) / (self.hi - self.lo) * (self.b - self.a)

    def ticks(self) -> list[float]:
        if self.log:
            return [
                t
                for t in _log_ticks(10**self.lo, 10**self.hi)
                if self.lo - 1e-9 <= math.log10(t) <= self.hi + 1e-9
            ]
        return [t for t in _ticks(self.lo, self.hi) if self.lo - 1e-9 <= t <= self.hi + 1e-9]


def _frame(width: int, height: int, title: str, x_label: str, y_label: str, desc: str) -> list[str]:
    return [
        f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f"<title>{escape(desc or title)}</title>",
        f'<text x="{MARGIN["left"]}" y="16" class="ct">{escape(title)}</text>',
        f'<text x="{(MARGIN["left"] + width - MARGIN["right"]) / 2:.1f}" y="{height - 6}" class="cl" '
        f'text-anchor="middle">{escape(x_label)}</text>',
        f'<text x="12" y="{(MARGIN["top"] + height - MARGIN["bottom"]) / 2:.1f}" class="cl" text-anchor="middle" '
        f'transform="rotate(-90 12 {(MARGIN["top"] + height - MARGIN["bottom"]) / 2:.1f})">{escape(y_label)}</text>',
    ]


def _axes(out: list[str], xa: _Axis, ya: _Axis, width: int, height: int, x_int: bool) -> None:
    x0, x1 = MARGIN["left"], width - MARGIN["right"]
    y0, y1 = height - MARGIN["bottom"], MARGIN["top"]
    for t in ya.ticks():
        y = ya(t)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{x0 - 5}" y="{y + 3.5:.1f}" class="tk" text-anchor="end">{_fmt(t)}</text>')
    xt = xa.ticks()
    if x_int and not xa.log:
        xt = sorted({round(t) for t in xt if abs(t - round(t)) < 1e-9})
    for t in xt:
        x = xa(t)
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + 4}" class="axis"/>')
        out.append(f'<text x="{x:.1f}" y="{y0 + 15}" class="tk" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" class="axis"/>')
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" class="axis"/>')


def line_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    refs: Sequence[tuple[str, float]] = (),
    width: int = 380,
    height: int = 230,
    x_log: bool = False,
    y_log: bool = False,
    markers: bool = True,
    x_int: bool = True,
    colors: Sequence[str] | None = None,
    mark: tuple[float, float] | None = None,
) -> str:
    """Lines of (x, y) points, one per series, with dashed horizontal reference lines `refs`; `mark`:
    a point drawn as a ring (the kept epoch)."""
    pts = [(x, y) for _, s in series for x, y in s if y is not None]
    ys = [y for _, y in pts] + [y for _, y in refs]
    desc = f"{title}: " + "; ".join(f"{name} ({len(s)} points)" for name, s in series)
    out = _frame(width, height, title, x_label, y_label, desc)
    if not pts:
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" class="cl" text-anchor="middle">no data</text></svg>'
        )
        return "".join(out)
    xs = [x for x, _ in pts]
    ylo, yhi = min(ys), max(ys)
    if not y_log:
        pad = (yhi - ylo) * 0.08 or abs(yhi) * 0.05 or 0.5
        ylo, yhi = ylo - pad, yhi + pad
    xa = _Axis(min(xs), max(xs), MARGIN["left"], width - MARGIN["right"], x_log)
    ya = _Axis(
        max(ylo, min(y for y in ys if y > 0)) if y_log else ylo,
        yhi,
        height - MARGIN["bottom"],
        MARGIN["top"],
        y_log,
    )
    _axes(out, xa, ya, width, height, x_int)
    for i, (name, s) in enumerate(series):
        c = (colors or PALETTE)[i % len(colors or PALETTE)]
        good = [(x, y) for x, y in s if y is not None]
        if not good:
            continue
        path = " ".join(f"{xa(x):.1f},{ya(y):.1f}" for x, y in good)
        out.append(
            f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="1.8"><title>{escape(name)}</title></polyline>'
        )
        if markers and len(good) <= 60:
            out += [f'<circle cx="{xa(x):.1f}" cy="{ya(y):.1f}" r="2.4" fill="{c}"/>' for x, y in good]
    if mark is not None and mark[1] is not None:
        out.append(
            f'<circle cx="{xa(mark[0]):.1f}" cy="{ya(mark[1]):.1f}" r="5" fill="none" stroke="#111" stroke-width="1.4"/>'
        )
    for j, (name, y) in enumerate(refs):
        yy = ya(y)
        out.append(
            f'<line x1="{MARGIN["left"]}" y1="{yy:.1f}" x2="{width - MARGIN["right"]}" y2="{yy:.1f}" '
            f'stroke="#6b7280" stroke-dasharray="5,4" stroke-width="1.3"/>'
        )
        out.append(
            f'<text x="{width - MARGIN["right"] - 2}" y="{yy - 4 - 11 * j:.1f}" class="tk" text-anchor="end">'
            f"{escape(name)}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def bar_chart(
    bars: Sequence[tuple[str, str, float]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 380,
    height: int = 230,
    fill: str = PALETTE[0],
) -> str:
    """Vertical bars given as (axis label, tooltip, value); every few bars labelled so labels stay readable."""
    desc = f"{title}: {len(bars)} bars"
    out = _frame(width, height, title, x_label, y_label, desc)
    if not bars:
        out.append("</svg>")
        return "".join(out)
    top = max(v for _, _, v in bars) or 1
    ya = _Axis(0, top * 1.05, height - MARGIN["bottom"], MARGIN["top"], False)
    x0, x1 = MARGIN["left"], width - MARGIN["right"]
    y0 = height - MARGIN["bottom"]
    for t in ya.ticks():
        y = ya(t)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{x0 - 5}" y="{y + 3.5:.1f}" class="tk" text-anchor="end">{_fmt(t)}</text>')
    w = (x1 - x0) / len(bars)
    longest = max(len(label) for label, _, _ in bars)
    every = max(1, math.ceil(len(bars) * (longest * 6 + 8) / (x1 - x0)))
    for i, (label, tip, v) in enumerate(bars):
        x = x0 + i * w
        y = ya(v)
        out.append(
            f'<rect x="{x + 0.8:.1f}" y="{y:.1f}" width="{max(w - 1.6, 0.8):.1f}" height="{y0 - y:.1f}" fill="{fill}">'
            f"<title>{escape(tip)}: {_fmt(v)}</title></rect>"
        )
        if i % every == 0:
            out.append(
                f'<text x="{x + w / 2:.1f}" y="{y0 + 15}" class="tk" text-anchor="middle">{escape(label)}</text>'
            )
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" class="axis"/>')
    out.append("</svg>")
    return "".join(out)
