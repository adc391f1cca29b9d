"""Charts drawn on the server as inline SVG: line charts with threshold lines, bars, progress bars.

Pages stay plain HTML (no chart library, no script, nothing fetched from elsewhere). Colours come
from CSS classes in ``static/dashboard.css`` and geometry from SVG attributes, so the pages' strict
Content-Security-Policy (no inline styles or scripts) holds. Every label is escaped: series names
can come from devices (feature names from a manifest, versions), which are never trusted as markup.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

WIDTH, HEIGHT = 520, 210
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 30, 30
MAX_SERIES_CLASSES = 8


@dataclass(frozen=True)
class Series:
    """One line: ``points`` are (unix time in seconds, value)."""

    label: str
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Threshold:
    """A horizontal line a value must stay on the right side of (a gate, a drift level)."""

    label: str
    value: float
    level: str = "gate"  # CSS class suffix: gate, warn, alert


@dataclass(frozen=True)
class Bar:
    """One bar of a bar chart, with the text written beside it."""

    label: str
    value: float
    text: str


def number(value: Any) -> str:
    """A short human form of a number (``0.0123``, ``41.7``, ``12,345``); anything else as text."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value == 0 or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _time_label(seconds: float, span_s: float) -> str:
    moment = dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
    return moment.strftime("%m-%d %H:%M" if span_s > 86_400 else "%H:%M:%S" if span_s < 600 else "%H:%M")


@dataclass(frozen=True)
class _Frame:
    """Maps data coordinates into the plot area."""

    x0: float
    x1: float
    y0: float
    y1: float

    def x(self, value: float) -> float:
        return LEFT + (value - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        return HEIGHT - BOTTOM - (value - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)


def _frame(series: Sequence[Series], thresholds: Sequence[Threshold], x_range: tuple[float, float] | None) -> _Frame:
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points] + [t.value for t in thresholds]
    x0, x1 = x_range if x_range is not None else (min(xs), max(xs))
    if x1 - x0 < 1:
        x0, x1 = x0 - 60, x1 + 60
    y0, y1 = min([0.0, *ys]), max(ys)
    if y1 - y0 <= 0:
        y1 = y0 + 1
    return _Frame(x0, x1, y0, y1 + (y1 - y0) * 0.08)


def _open_svg(cls: str, height: int, title: str, title_x: int) -> list[str]:
    label = escape(title)
    return [f'<svg class="{cls}" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{label}">',
            f"<title>{label}</title>", f'<text class="chart-title" x="{title_x}" y="16">{label}</text>']  # fmt: skip


def line_chart(
    title: str,
    series: Sequence[Series],
    thresholds: Sequence[Threshold] = (),
    fmt: Callable[[Any], str] = number,
    x_range: tuple[float, float] | None = None,
) -> Markup:
    """An SVG line chart of ``series`` over time with dashed ``thresholds``; a note when empty.

    ``x_range`` (unix seconds) fixes the time axis, e.g. to the whole period asked for, so that data
    from part of it is drawn where it happened; by default the axis spans the points.
    """
    drawn = [s for s in series if s.points]
    parts = _open_svg("chart", HEIGHT, title, LEFT)
    if not drawn:
        parts.append(f'<text class="chart-empty" x="{WIDTH / 2}" y="{HEIGHT / 2}">no data yet</text></svg>')
        return Markup("".join(parts))  # noqa: S704 - every interpolated text above is escaped
    frame = _frame(drawn, thresholds, x_range)
    parts += _axes(frame, fmt)
    parts += [_threshold(frame, t, fmt) for t in thresholds]
    for index, one in enumerate(drawn):
        parts += _series(frame, one, index % MAX_SERIES_CLASSES, fmt)
    parts += _legend(drawn)
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every interpolated text is escaped


def _axes(frame: _Frame, fmt: Callable[[Any], str]) -> list[str]:
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    out = [f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}"/>',
           f'<line class="axis" x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}"/>']  # fmt: skip
    for value in (frame.y0, (frame.y0 + frame.y1) / 2, frame.y1):
        y = frame.y(value)
        out.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{LEFT - 4}" y="{y + 3:.1f}" text-anchor="end">{escape(fmt(value))}</text>')
    span = frame.x1 - frame.x0
    for value, anchor in ((frame.x0, "start"), (frame.x1, "end")):
        label = escape(_time_label(value, span))
        out.append(
            f'<text class="tick" x="{frame.x(value):.1f}" y="{bottom + 16}" text-anchor="{anchor}">{label}</text>'
        )
    return out


def _threshold(frame: _Frame, threshold: Threshold, fmt: Callable[[Any], str]) -> str:
    y = frame.y(threshold.value)
    text = escape(f"{threshold.label} {fmt(threshold.value)}")
    level = escape(threshold.level)
    return (f'<line class="threshold {level}" x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}"/>'
            f'<text class="threshold-label {level}" x="{WIDTH - RIGHT - 2}" y="{y - 3:.1f}" '
            f'text-anchor="end">{text}</text>')  # fmt: skip


def _series(frame: _Frame, series: Series, index: int, fmt: Callable[[Any], str]) -> list[str]:
    coords = [(frame.x(x), frame.y(y), x, y) for x, y in series.points]
    path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _, _ in coords)
    out = [f'<polyline class="series s{index}" points="{path}"/>']
    span = frame.x1 - frame.x0
    for px, py, x, y in coords:
        tip = escape(f"{series.label}: {fmt(y)} at {_time_label(x, span)} UTC")
        out.append(f'<circle class="point s{index}" cx="{px:.1f}" cy="{py:.1f}" r="2.5"><title>{tip}</title></circle>')
    return out


def _legend(series: Sequence[Series]) -> list[str]:
    if len(series) < 2:
        return []
    out, x = [], float(WIDTH - RIGHT)
    for index in reversed(range(len(series))):
        label = series[index].label
        x -= 14 + 6.5 * len(label)
        cls = f"s{index % MAX_SERIES_CLASSES}"
        out.append(f'<rect class="swatch {cls}" x="{x:.1f}" y="8" width="10" height="10"/>'
                   f'<text class="legend" x="{x + 13:.1f}" y="17">{escape(label)}</text>')  # fmt: skip
    return out


def bar_chart(title: str, bars: Sequence[Bar]) -> Markup:
    """Horizontal bars (one per row), each labelled and annotated."""
    row_h, label_w, bar_w = 22, 150, 230
    height = TOP + row_h * max(1, len(bars))
    top = max([b.value for b in bars] + [0.0]) or 1.0
    parts = _open_svg("chart bars", height, title, 4)
    for index, bar in enumerate(bars):
        y = TOP + index * row_h
        length = max(1.0, bar.value / top * bar_w)
        cls = f"bar s{index % MAX_SERIES_CLASSES}"
        parts += [
            f'<text class="tick" x="{label_w - 6}" y="{y + 13}" text-anchor="end">{escape(bar.label)}</text>',
            f'<rect class="{cls}" x="{label_w}" y="{y + 3}" width="{length:.1f}" height="{row_h - 8}"/>',
            f'<text class="tick" x="{label_w + length + 6:.1f}" y="{y + 13}">{escape(bar.text)}</text>',
        ]
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every interpolated text is escaped


def stacked_bar(parts: Sequence[tuple[str, int]], total: int, width: int = 220, height: int = 14) -> Markup:
    """A progress bar: one segment per (outcome, count) out of ``total``, classed by outcome."""
    total = max(total, sum(count for _, count in parts), 1)
    out = [f'<svg class="progress" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">',
           f'<rect class="track" x="0" y="0" width="{width}" height="{height}"/>']  # fmt: skip
    x = 0.0
    for name, count in parts:
        if count <= 0:
            continue
        length = count / total * width
        out.append(f'<rect class="seg {escape(name)}" x="{x:.1f}" y="0" width="{length:.1f}" height="{height}">'
                   f"<title>{escape(name)}: {count}</title></rect>")  # fmt: skip
        x += length
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - every interpolated text is escaped
