"""A training run's loss curves as an inline SVG: one polyline per series, drawn on the server
from the metrics rows, so the page needs no plotting library and no JavaScript."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from markupsafe import Markup, escape

COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")
MAX_POINTS = 600  # per series; more points than pixels only make the page heavier


def _thin(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if len(finite) <= MAX_POINTS:
        return finite
    stride = math.ceil(len(finite) / MAX_POINTS)
    thinned = list(finite[::stride])
    if thinned[-1] != finite[-1]:
        thinned.append(finite[-1])
    return thinned


def _label(value: float) -> str:
    return f"{value:.3g}"


def loss_curve_svg(
    series: Mapping[str, Sequence[tuple[int, float]]], width: int = 640, height: int = 260
) -> Markup:
    """An SVG chart of ``{name: [(step, value), …]}``; a log y axis when the values are positive
    and span more than a factor of 20, as a loss falling from 1 to 0.01 does."""
    curves = {name: _thin(points) for name, points in series.items()}
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return Markup('<p class="muted">No metrics yet.</p>')
    steps = [s for points in curves.values() for s, _ in points]
    values = [v for points in curves.values() for _, v in points]
    x0, x1 = min(steps), max(steps)
    lo, hi = min(values), max(values)
    log_y = lo > 0 and hi / lo > 20

    def y_of(v: float) -> float:
        return math.log10(v) if log_y else v

    y0, y1 = y_of(lo), y_of(hi)
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    if x1 == x0:
        x1 = x0 + 1
    left, right, top, bottom = 56, 12, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(step: int) -> float:
        return left + (step - x0) / (x1 - x0) * plot_w

    def py(v: float) -> float:
        return top + (1 - (y_of(v) - y0) / (y1 - y0)) * plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="loss curve" xmlns="http://www.w3.org/2000/svg">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#d4d4d8"/>',
        # Axis labels: the extremes of each axis (and the scale when it is logarithmic).
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{_label(hi)}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">{_label(lo)}</text>',
        f'<text x="{left}" y="{height - 8}">{x0}</text>',
        f'<text x="{left + plot_w}" y="{height - 8}" text-anchor="end">step {x1}</text>',
    ]
    if log_y:
        parts.append(
            f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">log scale</text>'
        )
    for i, (name, points) in enumerate(sorted(curves.items())):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in points)
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}">'
            f"<title>{escape(name)}</title></polyline>"
        )
        # The legend sits top right, where a falling loss leaves room.
        parts.append(
            f'<text x="{left + plot_w - 8}" y="{top + 16 + 14 * i}" fill="{color}" '
            f'text-anchor="end">{escape(name)} {_label(points[-1][1])}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
