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
        for i, method in enumerate(methods):
            one = part[part["method"] == method]
            for offset, column, hatch in ((-0.18, "value", None), (0.18, "shuffled", "///")):
                values = pd.to_numeric(one[column], errors="coerce").dropna().to_numpy()
                if values.size == 0:
                    continue
                box = ax.boxplot(
                    values,
                    positions=[i + offset],
                    widths=0.32,
                    patch_artist=True,
                    showfliers=False,
                    showmeans=True,
                    meanprops={"marker": "D", "markerfacecolor": "black", "markersize": 4},
                )
                box["boxes"][0].set(facecolor="#9ecae1" if hatch is None else "white", hatch=hatch)
        ax.set_xticks(np.arange(len(methods)), methods, rotation=40, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    if not metrics:
        axes[0][0].text(0.5, 0.5, "no evaluation rows", ha="center", va="center")
    fig.suptitle(f"{title} (hatched: shuffled labels; diamond: mean)", fontsize=9)
    fig.tight_layout()
    return fig


def write_evaluation_plot(rows: pd.DataFrame, title: str, png: str | Path, svg: str | Path) -> None:
    fig = evaluation_figure(rows, title)
    try:
        for path, fmt in ((png, "png"), (svg, "svg")):
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=100)
    finally:
        plt.close(fig)
