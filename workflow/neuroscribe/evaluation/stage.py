"""The evaluation jobs: one per layer (every method's labels scored on the held-out images),
then one summary of them all.

Per neuron and method:
- `simulation_r` (any layer): Pearson correlation, over the held-out images, between what the
  simulator predicts from the label alone and the neuron's real activations;
- `class_named` and `class_text_similarity` (an output layer whose class names are known):
  whether the label names the neuron's class (or a synonym), and the sentence-embedding cosine
  of label and class name.
Each is also computed with the layer's labels shuffled among its neurons (a fixed seed): the
shuffled control. A label that cannot be scored keeps its row, with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from neuroscribe.config import TargetSpec
from neuroscribe.evaluation.classes import class_names
from neuroscribe.evaluation.metrics import bootstrap_interval, names_class, pearson_rows, shuffled
from neuroscribe.merge import stored_neurons
from neuroscribe.tables import write_table

log = logging.getLogger(__name__)

COLUMNS = ["model", "layer", "neuron", "method", "metric", "value", "shuffled", "scorer", "reason"]


def _heldout(layer_file: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Held-out rows of the merged file: their manifest rows, image ids, activations
    [images, neurons] (float32), and the stored neurons."""
    with h5py.File(layer_file, "r", locking=False) as h5:
        if "heldout" not in h5 or not h5["heldout"][:].any():
            raise ValueError(
                f"{layer_file} holds out no image: it was merged with evaluation off; rerun with "
                "evaluation.enabled: true so the merge holds images out"
            )
        mask = h5["heldout"][:]
        rows = h5["rows"][:][mask]
        ids = h5["image_ids"][:][mask].astype(str)
        index = np.flatnonzero(mask)
        activations = h5["activations"][index.min() : index.max() + 1][index - index.min()]
        neurons = stored_neurons(h5).tolist()
    return rows, ids, activations.astype(np.float32), neurons


def _simulation_rows(
    labels: dict[int, str | None],
    positions: dict[int, int],
    activations: np.ndarray,
    sim: Any,
    images: Sequence[Any],
    seed: int,
) -> list[dict[str, Any]]:
    neurons = list(labels)
    real = [labels[n] for n in neurons]
    control = shuffled(real, seed)
    distinct = list(dict.fromkeys(x for x in real if isinstance(x, str)))
    simulation = sim.predict(distinct, images)
    where = {label: j for j, label in enumerate(distinct)}
    actual = activations[:, [positions[n] for n in neurons]].T

    def scores(assigned: list[str | None]) -> tuple[np.ndarray, list[str | None]]:
        predicted = np.full(actual.shape, np.nan, dtype=np.float64)
        reasons: list[str | None] = []
        for i, label in enumerate(assigned):
            if not isinstance(label, str):
                reasons.append("no label")
                continue
            j = where[label]
            reasons.append(simulation.reasons[j])
            predicted[i] = simulation.predictions[j]
        r = pearson_rows(np.nan_to_num(predicted), actual)
        for i, why in enumerate(reasons):
            if why is not None:
                r[i] = np.nan
            elif np.isnan(r[i]):
                reasons[i] = (
                    "the neuron's activation is the same on every held-out image"
                    if np.ptp(actual[i]) == 0
                    else "the simulator predicts the same value for every held-out image (the "
                    "label's concept is in all of them or in none)"
                )
        return r, reasons

    r_real, why_real = scores(real)
    r_control, _ = scores(control)
    return [
        {
            "neuron": n,
            "metric": "simulation_r",
            "value": _number(r_real[i]),
            "shuffled": _number(r_control[i]),
            "scorer": sim.id,
            "reason": why_real[i],
        }
        for i, n in enumerate(neurons)
    ]


def _class_rows(
    labels: dict[int, str | None], names: list[list[str]], text_model: str | None, seed: int
) -> list[dict[str, Any]]:
    from neuroscribe.backends.textsim import SentenceSimilarity

    neurons = list(labels)
    real = [labels[n] for n in neurons]
    control = shuffled(real, seed)
    truth = [names[n][0] for n in neurons]
    text = SentenceSimilarity(text_model)

    def similarity(assigned: list[str | None]) -> list[float | None]:
        usable = [i for i, x in enumerate(assigned) if isinstance(x, str) and x.strip()]
        out: list[float | None] = [None] * len(assigned)
        if usable:
            values = text.pairwise([assigned[i] for i in usable], [truth[i] for i in usable])
            for i, v in zip(usable, values, strict=True):
                out[i] = float(v)
        return out

    sim_real, sim_control = similarity(real), similarity(control)
    rows = []
    for i, n in enumerate(neurons):
        why = None if isinstance(real[i], str) and real[i].strip() else "no label"
        rows += [
            {
                "neuron": n,
                "metric": "class_named",
                "value": names_class(real[i], names[n]),
                "shuffled": names_class(control[i], names[n]),
                "scorer": "words",
                "reason": why,
            },
            {
                "neuron": n,
                "metric": "class_text_similarity",
                "value": sim_real[i],
                "shuffled": sim_control[i],
                "scorer": text.id,
                "reason": why,
            },
        ]
    return rows


def _number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def evaluate_layer(
    descriptions: str | Path,
    layer_file: str | Path,
    manifest: str | Path,
    target: TargetSpec,
    layer: str,
    width: int,
    output_layer: bool,
    classes_file: str | None,
    simulator: dict[str, Any],
    text_model: str | None,
    worlds: Sequence[tuple[str, str]],
    out: str | Path,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Every labelling method's labels of one layer (`width` neurons wide, of which the
    described ones are stored), scored on its held-out images."""
    from neuroscribe.backends.simulators import ProbeImage
    from neuroscribe.backends.simulators import simulator as make_simulator

    table = pd.read_parquet(descriptions)
    table = table[(table["model"] == target.name) & (table["layer"] == layer)]
    rows_, ids, activations, stored = _heldout(layer_file)
    paths = pd.read_parquet(manifest, columns=["path"])["path"].to_numpy()
    images = [ProbeImage(i, str(paths[r])) for i, r in zip(ids, rows_, strict=True)]
    positions = {n: j for j, n in enumerate(stored)}
    names = None
    if output_layer:
        names = class_names(target, classes_file, width)
    sim = None
    out_rows: list[dict[str, Any]] = []
    for method, group in table.groupby("method", sort=True):
        if group["label"].isna().all():
            continue  # a method that does not label (topk)
        labels = {
            int(n): (x if isinstance(x, str) else None)
            for n, x in zip(group["neuron"], group["label"], strict=True)
        }
        if sim is None:
            sim = make_simulator(simulator, worlds, device, dtype)
        found = _simulation_rows(labels, positions, activations, sim, images, seed)
        if names is not None:
            found += _class_rows(labels, names, text_model, seed)
        out_rows += [
            {"model": target.name, "layer": layer, "method": str(method)} | row for row in found
        ]
    frame = pd.DataFrame(out_rows, columns=COLUMNS)
    write_table(frame, out, "evaluation_neurons")
    log.info(
        "%s/%s: %d held-out images, %d rows for %s",
        target.name,
        layer,
        len(images),
        len(frame),
        ", ".join(sorted(frame["method"].unique())) or "no labelling method",
    )


def summarise(
    parts: Sequence[str | Path],
    neurons_out: str | Path,
    summary_out: str | Path,
    csv_out: str | Path,
    bootstrap: int = 1000,
    seed: int = 0,
) -> None:
    """All layers' rows in one table, and per (model, layer, method, metric): the mean, its 95 %
    bootstrap interval, the neurons scored and not, and the shuffled control."""
    frames = [pd.read_parquet(p) for p in parts]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    write_table(rows, neurons_out, "evaluation_neurons")
    summary = []
    for (model, layer, method, metric), group in rows.groupby(
        ["model", "layer", "method", "metric"], sort=True
    ):
        values = group["value"].to_numpy(dtype=np.float64)
        control = group["shuffled"].to_numpy(dtype=np.float64)
        scored = ~np.isnan(values)
        low, high = bootstrap_interval(values, bootstrap, seed)
        mean = float(np.nanmean(values)) if scored.any() else None
        control_mean = float(np.nanmean(control)) if (~np.isnan(control)).any() else None
        summary.append(
            {
                "model": model,
                "layer": layer,
                "method": method,
                "metric": metric,
                "mean": mean,
                "ci_low": None if mean is None else low,
                "ci_high": None if mean is None else high,
                "neurons": int(scored.sum()),
                "unscored": int((~scored).sum()),
                "shuffled_mean": control_mean,
                "difference": None if mean is None or control_mean is None else mean - control_mean,
            }
        )
    table = pd.DataFrame(summary)
    write_table(table, summary_out, "evaluation_summary")
    Path(csv_out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv_out, index=False)
    for line in format_summary(table).splitlines():
        log.info("%s", line)


def format_summary(table: pd.DataFrame) -> str:
    """The summary as a small text table: mean [interval] against the shuffled control."""
    if table.empty:
        return "evaluation: no labelling method to score"
    lines = [
        f"{'layer':<12} {'method':<12} {'metric':<22} {'mean [95% CI]':<24} {'shuffled':>9} "
        f"{'n':>5} {'unscored':>8}"
    ]
    for r in table.itertuples(index=False):
        mean = "-" if r.mean is None or pd.isna(r.mean) else f"{r.mean:.3f}"
        ci = "" if r.mean is None or pd.isna(r.mean) else f" [{r.ci_low:.3f}, {r.ci_high:.3f}]"
        control = (
            "-" if r.shuffled_mean is None or pd.isna(r.shuffled_mean) else f"{r.shuffled_mean:.3f}"
        )
        lines.append(
            f"{r.layer:<12} {r.method:<12} {r.metric:<22} {mean + ci:<24} {control:>9} "
            f"{r.neurons:>5} {r.unscored:>8}"
        )
    return "\n".join(lines)
