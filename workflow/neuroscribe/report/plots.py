"""The index's evaluation plots (matplotlib, PNG and SVG): per layer, each metric's score
distribution per method next to its shuffled control."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a compute node
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from neuroscribe.io import atomic_path


def evaluation_figure(rows: pd.DataFrame, title: str) -> plt.Figure:
    """One panel per metric: a box per method (its labels) and a hatched box (shuffled)."""
    metrics = sorted(rows["metric"].unique())
    fig, axes = plt.subplots(
        1, max(len(metrics), 1), figsize=(3.2 * max(len(metrics), 1), 3.2), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=False):
        part = rows[rows["metric"] == metric]
        methods = sorted(part["method"].unique())
        # one boxplot call per kind (labels, shuffled) with every method's box: drawing is
        # most of the report's time on a small run
        for offset, column, face, hatch in (
            (-0.18, "value", "#9ecae1", None),
            (0.18, "shuffled", "white", "///"),
        ):
            data, positions = [], []
            for i, method in enumerate(methods):
                values = part.loc[part["method"] == method, column]
                values = pd.to_numeric(values, errors="coerce").dropna().to_numpy()
                if values.size:
                    data.append(values)
                    positions.append(i + offset)
            if not data:
                continue
            boxes = ax.boxplot(
                data,
                positions=positions,
                widths=0.32,
                patch_artist=True,
                showfliers=False,
                showmeans=True,
                meanprops={"marker": "D", "markerfacecolor": "black", "markersize": 4},
            )
            for box in boxes["boxes"]:
                box.set(facecolor=face, hatch=hatch)
        ax.set_xticks(np.arange(len(methods)), methods, rotation=40, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    if not metrics:
        axes[0][0].text(0.5, 0.5, "no evaluation rows", ha="center", va="center")
    fig.suptitle(f"{title} (hatched: shuffled labels; diamond: mean)", fontsize=9)
    # fixed margins: tight_layout measures every label and costs more than the drawing
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.3, top=0.84, wspace=0.3)
    return fig


def write_evaluation_plot(rows: pd.DataFrame, title: str, png: str | Path, svg: str | Path) -> None:
    fig = evaluation_figure(rows, title)
    try:
        for path, fmt in ((png, "png"), (svg, "svg")):
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=100)
    finally:
        plt.close(fig)
