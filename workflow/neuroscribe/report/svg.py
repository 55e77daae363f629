"""The geometry of the small inline charts on neuron pages (histogram, scatter, bars).

Computed here, drawn as SVG by `templates/macros.html.j2`: numbers only, so the charts need
no script and no image file, and thousands of neuron pages render in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WIDTH, HEIGHT = 320, 90


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    title: str


@dataclass(frozen=True)
class Histogram:
    bars: list[Rect]
    marks: list[Rect]  # the exemplars' activations, as thin red lines
    low: float
    high: float
    width: int = WIDTH
    height: int = HEIGHT


@dataclass(frozen=True)
class Scatter:
    points: list[tuple[float, float, str]]
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    x_label: str
    y_label: str
    width: int = 200
    height: int = 200


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    share: float  # of the largest absolute value, 0..1
    note: str = ""


def histogram(values: np.ndarray, marks: Sequence[float], bins: int = 40) -> Histogram | None:
    """Bars of `values` with `marks` as vertical lines; None without finite values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    step = WIDTH / bins
    tallest = max(int(counts.max()), 1)
    bars = [
        Rect(
            x=i * step,
            y=HEIGHT - HEIGHT * c / tallest,
            w=max(step - 1, 1),
            h=HEIGHT * c / tallest,
            title=f"{edges[i]:.3g} to {edges[i + 1]:.3g}: {c} images",
        )
        for i, c in enumerate(counts.tolist())
        if c
    ]
    scale = WIDTH / (high - low)
    lines = [
        Rect(x=min(max((m - low) * scale, 0), WIDTH - 1), y=0, w=1.5, h=HEIGHT, title=f"{m:.3g}")
        for m in marks
        if m is not None and np.isfinite(m)
    ]
    return Histogram(bars=bars, marks=lines, low=low, high=high)


def scatter(x: Sequence[float], y: Sequence[float], x_label: str, y_label: str) -> Scatter | None:
    """Points scaled into the chart; None when there are none."""
    pairs = [
        (float(a), float(b))
        for a, b in zip(x, y, strict=False)
        if a is not None and b is not None and np.isfinite(a) and np.isfinite(b)
    ]
    if not pairs:
        return None
    xs, ys = np.array(pairs).T
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = float(ys.min()), float(ys.max())
    x1, y1 = (x1 if x1 > x0 else x0 + 1.0), (y1 if y1 > y0 else y0 + 1.0)
    size, pad = 200, 8
    points = [
        (
            pad + (a - x0) / (x1 - x0) * (size - 2 * pad),
            size - pad - (b - y0) / (y1 - y0) * (size - 2 * pad),
            f"{x_label} {a:.3g}, {y_label} {b:.3g}",
        )
        for a, b in pairs
    ]
    return Scatter(points, (x0, x1), (y0, y1), x_label, y_label)


def bars(
    labels: Sequence[str], values: Sequence[float], notes: Sequence[str] | None = None
) -> list[Bar]:
    """Horizontal bars, each as a share of the largest absolute value."""
    values = [float(v) for v in values]
    largest = max((abs(v) for v in values if np.isfinite(v)), default=0.0) or 1.0
    notes = list(notes) if notes is not None else [""] * len(values)
    return [
        Bar(str(label), v, abs(v) / largest if np.isfinite(v) else 0.0, note)
        for label, v, note in zip(labels, values, notes, strict=False)
    ]
