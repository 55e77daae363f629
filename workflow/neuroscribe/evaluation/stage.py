"""The evaluation jobs: one per layer (every method's labels scored on the held-out images),
then one summary of them all.

Per neuron and method:
- `simulation_r` (any layer): Pearson correlation, over the held-out images, between what the
  simulator predicts from the label alone and the neuron's real activations;
- `class_named`, `class_text_similarity` and `class_clip_similarity` (an output layer whose
  class names are known): whether the label names the neuron's class (or a synonym), and the
  cosine of label and class name in a sentence-embedding space and in CLIP's text space.
Each is also computed with the layer's labels shuffled among its neurons (a fixed seed): the
shuffled control. A label that cannot be scored keeps its row, with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from neuroscribe.config import TargetSpec
from neuroscribe.evaluation.checks import llm_settings
from neuroscribe.evaluation.classes import class_names
from neuroscribe.evaluation.external import external_labels
from neuroscribe.evaluation.metrics import bootstrap_interval, names_class, pearson_rows, shuffled
from neuroscribe.merge import stored_neurons
from neuroscribe.tables import write_table

log = logging.getLogger(__name__)

COLUMNS = [
    "model",
    "layer",
    "neuron",
    "method",
    "metric",
    "value",
    "shuffled",
    "scorer",
    "reason",
    "truth",
]


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
    short = [m for m in simulation.missing if m]
    if short:
        log.warning(
            "%s gave no value for some held-out images under %d of %d labels (%d values in "
            "all); their r is over the images it gave one for",
            sim.id,
            len(short),
            len(distinct),
            sum(short),
        )
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
                continue
            # a simulator that reads replies (llm) may give no value for some images: r over
            # the images it gave one for, nothing guessed for the others
            given = np.isfinite(predicted[i])
            if not given.any():
                r[i] = np.nan
                reasons[i] = "the simulator gave no value for any held-out image"
            elif not given.all():
                r[i] = pearson_rows(predicted[i][None, given], actual[i][None, given])[0]
            if np.isnan(r[i]) and reasons[i] is None:
                reasons[i] = (
                    "the neuron's activation is the same on every held-out image"
                    if np.ptp(actual[i][given]) == 0
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


@dataclass
class Scorers:
    """The models a layer's evaluation needs, each loaded on first use (a layer whose methods
    all come from the cache loads none). The `llm` simulator reads the held-out images'
    captions (`captioner`, its annotated `captioner_worlds`) and asks the `llm` role, its replies
    cached under `cache`; use the scorers in a `with` block, which closes that cache."""

    simulator: dict[str, Any]
    text_model: str | None
    clip_model: str | None
    worlds: Sequence[tuple[str, str]]
    device: str
    dtype: str
    captioner: dict[str, Any] | None = None
    captioner_worlds: Sequence[tuple[str, str]] = ()
    llm: dict[str, Any] | None = None
    cache: str | Path | None = None
    _loaded: dict[str, Any] = field(default_factory=dict)
    _open: ExitStack = field(default_factory=ExitStack)

    def __enter__(self) -> Scorers:
        return self

    def __exit__(self, *exc: object) -> None:
        self._open.close()

    def _get(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._loaded:
            self._loaded[key] = make()
        return self._loaded[key]

    @property
    def reads_captions(self) -> bool:
        return self.simulator["backend"] == "llm"

    def simulate(self) -> Any:
        from neuroscribe.backends.simulators import llm_simulator, simulator

        if not self.reads_captions:
            return self._get(
                "simulator", lambda: simulator(self.simulator, self.worlds, self.device, self.dtype)
            )

        def make() -> Any:
            from neuroscribe.cache import DiskCache

            if self.llm is None or self.cache is None:
                raise ValueError("the llm simulator needs the `llm` section and the cache folder")
            store = self._open.enter_context(DiskCache(self.cache, "llm"))
            return llm_simulator(
                self.llm,
                store,
                self.device,
                self.dtype,
                logprobs=self.simulator.get("logprobs", True),
                seed=self.llm.get("seed", 0),
            )

        return self._get("simulator", make)

    def probe_images(self, images: list[Any], manifest: str | Path) -> list[Any]:
        """The held-out images as the simulator reads them: for `llm`, each with its caption,
        through the run's caption cache (each image captioned once, for every method)."""
        if not self.reads_captions:
            return images

        def caption() -> list[Any]:
            from dataclasses import replace

            from neuroscribe.backends import caption_images

            if self.captioner is None or self.cache is None:
                raise ValueError("the llm simulator needs the `captioner` section and the cache")
            captions, cached = caption_images(
                [i.image_id for i in images],
                manifest,
                self.captioner,
                self.captioner_worlds,
                self.cache,
                self.device,
                self.dtype,
            )
            s = cached.stats
            log.info(
                "captions: %d held-out images, %d from the cache, %d captioned by %s",
                s.unique,
                s.cache_hits,
                s.captioned,
                cached.id,
            )
            return [replace(i, caption=c) for i, c in zip(images, captions, strict=True)]

        return self._get("images", caption)

    def log_llm(self) -> None:
        """The LLM client's requests, cache hits and tokens, when the llm simulator ran."""
        client = getattr(self._loaded.get("simulator"), "client", None)
        if client is not None:
            log.info("llm: %s", client.stats.as_dict())

    def sentences(self) -> Any:
        from neuroscribe.backends.textsim import SentenceSimilarity

        return self._get("text", lambda: SentenceSimilarity(self.text_model))

    def clip_text(self) -> Any:
        """The CLIP model of the class-name cosine: the simulator's own when it is that model."""
        from neuroscribe.backends.simulators import ClipSimulator

        sim = self.simulator
        if sim["backend"] == "clip" and sim["model"] == self.clip_model:
            return self.simulate()
        return self._get(
            "clip", lambda: ClipSimulator(str(self.clip_model), self.device, self.dtype)
        )


def _pairwise(
    similarity: Callable[[list[str], list[str]], Sequence[float]],
    labels: list[str | None],
    truths: list[str],
) -> list[float | None]:
    usable = [i for i, x in enumerate(labels) if isinstance(x, str) and x.strip()]
    out: list[float | None] = [None] * len(labels)
    if usable:
        values = similarity([labels[i] for i in usable], [truths[i] for i in usable])  # type: ignore[misc]
        for i, v in zip(usable, values, strict=True):
            out[i] = float(v)
    return out


def _class_rows(
    labels: dict[int, str | None], names: list[list[str]], scorers: Scorers, seed: int
) -> list[dict[str, Any]]:
    neurons = list(labels)
    real = [labels[n] for n in neurons]
    control = shuffled(real, seed)
    truth = [names[n][0] for n in neurons]
    metrics: list[tuple[str, str, list[Any], list[Any]]] = [
        (
            "class_named",
            "words",
            [names_class(x, names[n]) for x, n in zip(real, neurons, strict=True)],
            [names_class(x, names[n]) for x, n in zip(control, neurons, strict=True)],
        )
    ]
    text = scorers.sentences()
    metrics.append(
        (
            "class_text_similarity",
            text.id,
            _pairwise(text.pairwise, real, truth),
            _pairwise(text.pairwise, control, truth),
        )
    )
    if scorers.clip_model:
        clip = scorers.clip_text()
        metrics.append(
            (
                "class_clip_similarity",
                clip.id,
                _pairwise(clip.text_cosine, real, truth),
                _pairwise(clip.text_cosine, control, truth),
            )
        )
    rows = []
    for i, n in enumerate(neurons):
        why = None if isinstance(real[i], str) and real[i].strip() else "no label"
        for metric, scorer, values, shuffled_values in metrics:
            rows.append(
                {
                    "neuron": n,
                    "metric": metric,
                    "value": values[i],
                    "shuffled": shuffled_values[i],
                    "scorer": scorer,
                    "reason": why,
                }
            )
    return rows


def _number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _truth_rows(
    labels: dict[int, str | None] | None,
    exemplars: dict[int, list[str]],
    truth: Any,
    scorers: Scorers,
    seed: int,
) -> list[dict[str, Any]]:
    """The demo world's truth metrics: `exemplar_precision` (any method with exemplars) and,
    for a labelling method, `truth_named` and `truth_text_similarity` (with their shuffled
    control)."""
    from neuroscribe.demo.evaluation import names_truth, truth_phrase

    rows = []
    for n, ids in exemplars.items():
        precision = truth.precision(n, ids)
        rows.append(
            {
                "neuron": n,
                "metric": "exemplar_precision",
                "value": precision,
                "shuffled": None,
                "scorer": "demo-truth",
                "reason": None if precision is not None else "no exemplars",
                "truth": truth.truth[n],
            }
        )
    if labels is None:
        return rows
    neurons = [n for n in labels if n in truth.truth]
    real = [labels[n] for n in neurons]
    control = shuffled(real, seed)
    phrases = [truth_phrase(truth.truth[n]) for n in neurons]
    text = scorers.sentences()
    similar = _pairwise(text.pairwise, real, phrases)
    similar_control = _pairwise(text.pairwise, control, phrases)
    for i, n in enumerate(neurons):
        why = None if isinstance(real[i], str) and real[i].strip() else "no label"
        common = {"neuron": n, "reason": why, "truth": truth.truth[n]}
        rows += [
            common
            | {
                "metric": "truth_named",
                "value": names_truth(real[i], truth.truth[n]),
                "shuffled": names_truth(control[i], truth.truth[n]),
                "scorer": "demo-truth",
            },
            common
            | {
                "metric": "truth_text_similarity",
                "value": similar[i],
                "shuffled": similar_control[i],
                "scorer": text.id,
            },
        ]
    return rows


def _all_images(layer_file: str | Path) -> tuple[list[str], np.ndarray]:
    """Every image id of the merged file and the activations [images, neurons] (float32)."""
    with h5py.File(layer_file, "r", locking=False) as h5:
        return list(h5["image_ids"][:].astype(str)), h5["activations"][:].astype(np.float32)


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


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
    cache: str | Path,
    clip_model: str | None = None,
    external: Sequence[dict[str, Any]] = (),
    truth_worlds: Sequence[tuple[str, str]] = (),
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    captioner: dict[str, Any] | None = None,
    captioner_worlds: Sequence[tuple[str, str]] = (),
    llm: dict[str, Any] | None = None,
) -> None:
    """Every labelling method's labels of one layer (`width` neurons wide, of which the
    described ones are stored), and those of `external` tables, scored on its held-out images;
    on demo worlds (`truth_worlds`), each method also against the world's truth. Each method's
    rows are kept in `cache` under a digest of everything they depend on, so a rerun after a
    method was added scores only the new one.

    The `llm` simulator reads the held-out images' captions, made by `captioner` (the config's
    section; `captioner_worlds` the annotated worlds its `annotations` backend reads) through
    the run's caption cache, and asks the `llm` role (the config's section, model filled in),
    its replies in the run's LLM cache: one request per distinct label."""
    from neuroscribe.backends.simulators import ProbeImage

    table = pd.read_parquet(descriptions)
    table = table[(table["model"] == target.name) & (table["layer"] == layer)]
    rows_, ids, activations, stored = _heldout(layer_file)
    paths = pd.read_parquet(manifest, columns=["path"])["path"].to_numpy()
    images = [ProbeImage(i, str(paths[r])) for i, r in zip(ids, rows_, strict=True)]
    positions = {n: j for j, n in enumerate(stored)}
    names = class_names(target, classes_file, width) if output_layer else None
    reads_captions = simulator["backend"] == "llm"
    if reads_captions and (captioner is None or llm is None):
        raise ValueError("the llm simulator needs the `captioner` and `llm` sections")
    methods: dict[str, dict[int, str | None]] = {}
    exemplars: dict[str, dict[int, list[str]]] = {}
    for method, group in table.groupby("method", sort=True):
        exemplars[str(method)] = {
            int(n): list(e) for n, e in zip(group["neuron"], group["exemplar_ids"], strict=True)
        }
        if group["label"].notna().any():  # a method that does not label (topk): no label rows
            methods[str(method)] = {
                int(n): (x if isinstance(x, str) else None)
                for n, x in zip(group["neuron"], group["label"], strict=True)
            }
    methods |= external_labels(external, target.name, layer, stored)
    truth = None
    if truth_worlds:
        from neuroscribe.demo.evaluation import layer_truth

        all_ids, all_activations = _all_images(layer_file)
        classes = None if names is None else [n[0] for n in names]
        truth = layer_truth(truth_worlds, all_ids, all_activations, stored, classes)
    # what every method's rows depend on besides its labels; the llm-only settings only with
    # the llm simulator, so the other simulators' digests (and their cached rows) stay as they were
    parts: list[Any] = [
        simulator if reads_captions else {k: v for k, v in simulator.items() if k != "logprobs"},
        text_model,
        clip_model,
        seed,
        names,
        None if truth is None else sorted(truth.truth.items()),
        ids.tolist(),
        hashlib.sha256(np.ascontiguousarray(activations).tobytes()).hexdigest(),
    ]
    if reads_captions:
        from neuroscribe.backends.simulators import SimulatorPrompts

        assert captioner is not None and llm is not None
        # the simulator's prompt texts too: an edit of them scores every method again
        parts.append(llm_settings(captioner, llm) | {"prompts": SimulatorPrompts.load().digest})
    common = _digest(*parts)
    folder = Path(cache) / "evaluation" / target.name / layer
    out_rows: list[dict[str, Any]] = []
    reused = []
    with Scorers(
        simulator,
        text_model,
        clip_model,
        worlds,
        device,
        dtype,
        captioner=captioner,
        captioner_worlds=captioner_worlds,
        llm=llm,
        cache=cache,
    ) as scorers:
        for method in sorted(set(methods) | (set(exemplars) if truth is not None else set())):
            labels = methods.get(method)
            mine = exemplars.get(method, {}) if truth is not None else {}
            key = _digest(common, sorted((labels or {}).items()), sorted(mine.items()))
            cached = folder / f"{method}-{key}.parquet"
            if cached.is_file():
                found = pd.read_parquet(cached).to_dict("records")
                reused.append(method)
            else:
                found = []
                if labels is not None:
                    found += _simulation_rows(
                        labels,
                        positions,
                        activations,
                        scorers.simulate(),
                        scorers.probe_images(images, manifest),
                        seed,
                    )
                    if names is not None:
                        found += _class_rows(labels, names, scorers, seed)
                if truth is not None:
                    found += _truth_rows(labels, mine, truth, scorers, seed)
                found = [
                    {"model": target.name, "layer": layer, "method": method, "truth": None} | r
                    for r in found
                ]
                write_table(pd.DataFrame(found, columns=COLUMNS), cached, "evaluation_neurons")
            out_rows += found
        scorers.log_llm()
    frame = pd.DataFrame(out_rows, columns=COLUMNS)
    write_table(frame, out, "evaluation_neurons")
    log.info(
        "%s/%s: %d held-out images, %d rows for %s%s",
        target.name,
        layer,
        len(images),
        len(frame),
        ", ".join(sorted(set(frame["method"]))) or "no labelling method",
        f" ({', '.join(reused)} from the cache)" if reused else "",
    )


def write_split(manifest: str | Path, holdout: float, out: str | Path) -> int:
    """The manifest's images with their `heldout` flag (the split every layer file records), as
    a table beside the evaluation; returns how many are held out."""
    from neuroscribe.evaluation.split import heldout_mask

    table = pd.read_parquet(manifest, columns=["image_id", "path", "dataset"])
    table["heldout"] = heldout_mask(table["image_id"], holdout)
    write_table(table, out, "split")
    return int(table["heldout"].sum())


def summarise(
    parts: Sequence[str | Path],
    neurons_out: str | Path,
    summary_out: str | Path,
    csv_out: str | Path,
    manifest: str | Path | None = None,
    holdout: float = 0.0,
    split_out: str | Path | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> None:
    """All layers' rows in one table, and per (model, layer, method, metric): the mean, its 95 %
    bootstrap interval, the neurons scored and not, and the shuffled control; with `split_out`,
    the held-out split of the manifest's images too."""
    if split_out is not None and manifest is not None:
        held = write_split(manifest, holdout, split_out)
        log.info("held out: %d probe images (%s)", held, split_out)
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
