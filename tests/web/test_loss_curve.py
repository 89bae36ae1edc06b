"""The server-drawn loss curve: points land where the axes say they should."""

from __future__ import annotations

import math
import re

import pytest

from web.loss_curve import MAX_POINTS, loss_curve_svg


def polylines(svg: str) -> list[list[tuple[float, float]]]:
    out = []
    for points in re.findall(r'points="([^"]+)"', svg):
        pairs = [p.split(",") for p in points.split()]
        out.append([(float(x), float(y)) for x, y in pairs])
    return out


def test_linear_axes_map_the_extremes_to_the_plot_corners() -> None:
    svg = str(loss_curve_svg({"loss": [(0, 2.0), (50, 1.5), (100, 1.0)]}, width=356, height=140))
    ((first, middle, last),) = polylines(svg)
    # Plot area: x from 56 to 356-12=344, y from 12 to 140-28=112 (top = highest value).
    assert first == (56.0, 12.0) and last == (344.0, 112.0)
    assert middle == (200.0, 62.0)
    assert "log scale" not in svg


def test_a_loss_spanning_decades_gets_a_log_axis() -> None:
    svg = str(loss_curve_svg({"loss": [(0, 1.0), (1, 0.1), (2, 0.01)]}, width=356, height=140))
    ((a, b, c),) = polylines(svg)
    # Equal ratios are equal steps on a log axis: 0.1 sits half way between 1 and 0.01.
    assert b[1] == pytest.approx((a[1] + c[1]) / 2)
    assert "log scale" in svg


def test_each_series_gets_its_own_line_and_legend() -> None:
    svg = str(loss_curve_svg({"loss": [(0, 1.0), (1, 0.5)], "val_loss": [(0, 1.2), (1, 0.7)]}))
    assert len(polylines(svg)) == 2
    assert "<title>loss</title>" in svg and "<title>val_loss</title>" in svg


def test_non_finite_values_are_skipped_and_long_series_thinned() -> None:
    series = [(i, 1.0 / (i + 1)) for i in range(5000)] + [(5000, math.nan)]
    (line,) = polylines(str(loss_curve_svg({"loss": series})))
    assert len(line) <= MAX_POINTS + 1
    assert line[-1][0] == pytest.approx(640 - 12)  # the last finite step is still drawn


def test_no_metrics_says_so() -> None:
    assert "No metrics yet" in str(loss_curve_svg({}))
    assert "No metrics yet" in str(loss_curve_svg({"loss": [(1, math.inf)]}))


def test_metric_names_are_escaped() -> None:
    svg = str(loss_curve_svg({"<script>": [(0, 1.0), (1, 2.0)]}))
    assert "<script>" not in svg and "&lt;script&gt;" in svg
