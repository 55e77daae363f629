"""TeLLMe's stages.

- `tellme_captions` (per chunk, a GPU job with a model captioner): picks each neuron's explain
  set and scoring sample (`sets`) from the layer's merged activations and captions every distinct
  image once, through the run's caption cache (shared with every other job and method);
- `tellme_weights` (per layer, CPU): each neuron's effective weights to the classes, for the
  layers the config names (`classweights`); other layers get an empty table;
- `tellme` (per chunk, the LLM): per neuron and variant, k candidate explanations in one
  request, one simulation per candidate, the best chosen on the validation part and scored on
  the test part.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from neuroscribe import backends
from neuroscribe.cache import DiskCache
from neuroscribe.config import TargetSpec
from neuroscribe.failures import Failure, check_failures
from neuroscribe.merge import columns_of
from neuroscribe.methods.tellme.explainer import Explained, Item
from neuroscribe.methods.tellme.scoring import choose
from neuroscribe.methods.tellme.sets import (
    EXPLAIN,
    VALIDATION,
    SetSizes,
    class_sets,
    neuron_sets,
)
from neuroscribe.redaction import redact, secret_values
from neuroscribe.tables import read_tables, write_table

log = logging.getLogger(__name__)

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
SCORE_KIND = "simulation_r_test"
ACTIVATIONS, WEIGHTS = "activations", "weights"


def _layer_columns(layer_file: str | Path, neurons: Sequence[int]) -> dict[str, Any]:
    """The layer file's image ids, held-out flags and the columns of `neurons` (ascending)."""
    with h5py.File(layer_file, "r", locking=False) as h5:
        columns = columns_of(h5, list(neurons))
        heldout = h5["heldout"][:] if "heldout" in h5 else np.zeros(len(h5["rows"]), dtype=bool)
        return {
            "model": str(h5.attrs["model"]),
            "layer": str(h5.attrs["layer"]),
            "ids": h5["image_ids"][:].astype(str),
            "heldout": heldout,
            "activations": h5["activations"][:, columns].astype(np.float32),
        }


def caption_chunk(
    layer_file: str | Path,
    manifest: str | Path,
    neurons: list[int],
    out: str | Path,
    sets: dict[str, Any],
    captioner: dict[str, Any],
    worlds: Sequence[tuple[str, str]],
    cache: str | Path,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Each neuron's explain set and scoring sample, with every image's caption (each distinct
    image captioned once, ever, through the run's caption cache)."""
    layer = _layer_columns(layer_file, neurons)
    if not layer["heldout"].any():
        raise ValueError(
            f"{layer_file} holds out no image, so TeLLMe has nothing to score on; it was merged "
            "before the held-out split was on: delete it and rerun"
        )
    table = neuron_sets(
        layer["activations"], layer["heldout"], layer["ids"], neurons, SetSizes.from_config(sets)
    )
    distinct = list(dict.fromkeys(table["image_id"]))
    captions, cached = backends.caption_images(
        distinct, manifest, captioner, worlds, cache, device, dtype
    )
    by_id = dict(zip(distinct, captions, strict=True))
    s = cached.stats
    log.info(
        "tellme captions: %d neurons, %d images listed, %d distinct, %d from the cache, "
        "%d captioned by %s",
        len(neurons),
        len(table),
        len(distinct),
        s.cache_hits,
        s.captioned,
        cached.id,
    )
    table["caption"] = [by_id[i] for i in table["image_id"]]
    table["captioner"] = cached.id
    table.insert(0, "layer", layer["layer"])
    table.insert(0, "model", layer["model"])
    write_table(table.drop(columns="position"), out, SCHEMAS / "tellme_captions.schema.yaml")


def weights_layer(
    target: TargetSpec,
    layer: str,
    neurons: list[int],
    width: int,
    out: str | Path,
    enabled: bool,
    path: list[str] | None = None,
    classes_file: str | None = None,
) -> None:
    """Every described neuron's effective weights to the classes, with the class names (an empty
    table for a layer the weight-based variant does not describe)."""
    columns = ["model", "layer", "neuron", "classes", "weights", "path"]
    if not enabled:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
        write_table(empty.astype({"neuron": "int64"}), out, SCHEMAS / "tellme_weights.schema.yaml")
        return
    import torch

    from neuroscribe.classweights import effective_weights, find_path
    from neuroscribe.evaluation.classes import class_names
    from neuroscribe.models import build_target

    with torch.inference_mode():
        loaded = build_target(target)
        found = find_path(loaded.module, layer, path)
        matrix = effective_weights(loaded.module, found, neurons=width)  # [classes, width]
    names = class_names(target, classes_file, matrix.shape[0])
    if names is None:
        raise ValueError(
            f"{target.name}: no class names for its {matrix.shape[0]} classes, so the "
            "weight-based explanations have nothing to list; give a file with one class name "
            "per line as targets[].classes"
        )
    classes = [n[0] for n in names]
    frame = pd.DataFrame(
        {
            "model": target.name,
            "layer": layer,
            "neuron": neurons,
            "classes": [classes] * len(neurons),
            "weights": [matrix[:, n].astype(float).tolist() for n in neurons],
            "path": [list(found.steps)] * len(neurons),
        }
    )
    log.info(
        "%s/%s: effective weights of %d neurons to %d classes through %s",
        target.name,
        layer,
        len(neurons),
        len(classes),
        " -> ".join(found.steps),
    )
    write_table(frame, out, SCHEMAS / "tellme_weights.schema.yaml")


def build_explainer(
    llm: dict[str, Any], explain: dict[str, Any], store: DiskCache, device: str, dtype: str
) -> Any:
    """The configured explainer: the `none` frequency explainer or the LLM one."""
    from neuroscribe.methods.tellme.explainer import FrequencyExplainer, LlmExplainer
    from neuroscribe.methods.tellme.prompts import load_prompts

    if llm["backend"] == "none":
        return FrequencyExplainer(k=explain["candidates"])
    return LlmExplainer(
        backends.llm_client(llm, store, device, dtype),
        llm["model"],
        load_prompts(explain["prompts"]),
        mode=explain["prompt_mode"],
        k=explain["candidates"],
        via=explain["candidates_via"],
        temperature=explain["temperature"],
        max_tokens=explain["max_tokens"],
        seed=llm.get("seed", 0),
    )


def build_simulator(
    cfg: dict[str, Any],
    llm: dict[str, Any],
    explainer: Any,
    worlds: Sequence[tuple[str, str]],
    device: str,
    dtype: str,
) -> Any:
    """The configured simulator; `llm` simulates with the explainer's own client."""
    from neuroscribe.backends.simulators import LlmSimulator, simulator

    if cfg["backend"] != "llm":
        return simulator(cfg, worlds, device, dtype)
    return LlmSimulator(explainer.client, llm["model"], logprobs=cfg["logprobs"])


def _number(value: Any) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _row(
    neuron: int,
    variant: str,
    explained: Explained,
    items: pd.DataFrame,
    simulation: Any,
    error: str | None,
) -> dict[str, Any]:
    """One (neuron, variant) row: the candidates, their simulations and scores, the choice."""
    scored = items[items["part"] != EXPLAIN]
    validation = (scored["part"] == VALIDATION).to_numpy()
    actual = scored["activation"].to_numpy(dtype=np.float64)
    row: dict[str, Any] = {
        "neuron": neuron,
        "variant": variant,
        "candidates": explained.candidates,
        "raw_replies": explained.raw_replies,
        "explain_items": int((items["part"] == EXPLAIN).sum()),
        "validation_items": int(validation.sum()),
        "test_items": int((~validation).sum()),
        "scored_items": scored["key"].tolist(),
        "scored_parts": scored["part"].tolist(),
        "actual": actual.tolist(),
        "llm_requests": explained.requests,
        "llm_cache_hits": explained.cache_hits,
        "prompt_tokens": explained.prompt_tokens,
        "completion_tokens": explained.completion_tokens,
        "validation_r": [],
        "test_r": [],
        "chosen": None,
        "predicted": [],
        "score_reason": None,
        "simulation_reading": None,
        "simulation_missing": 0,
        "simulation_extra": 0,
        "simulation_replies": [],
        "status": "ok",
        "error": None,
        "label": None,
        "labels": [],
        "score": None,
    }
    error = error or explained.error
    if error is not None:
        return row | {"status": "failed", "error": error}
    if not len(scored):
        kind = "class" if variant == WEIGHTS else "held-out image"
        why = (
            f"no {kind} left to score: the explainer was shown all {row['explain_items']}"
            if variant == WEIGHTS
            else f"no {kind} to score on"
        )
        return row | {
            "label": explained.candidates[0],
            "labels": explained.candidates[:3],
            "score_reason": f"chosen without validation (the explainer's first): {why}",
        }
    predictions = np.asarray(simulation.predictions, dtype=np.float64)
    usable = [j for j, why in enumerate(simulation.reasons) if why is None]
    choice = choose(predictions[usable], actual, validation) if usable else None
    if choice is None or choice.index is None:
        why = "; ".join(sorted({w for w in simulation.reasons if w})) or "nothing to simulate"
        return row | {"status": "failed", "error": f"no candidate could be simulated: {why}"}
    chosen = usable[choice.index]
    validation_r: list[float | None] = [None] * len(explained.candidates)
    test_r: list[float | None] = [None] * len(explained.candidates)
    for j, v, t in zip(usable, choice.validation_r, choice.test_r, strict=True):
        validation_r[j], test_r[j] = v, t
    ranked = sorted(
        range(len(explained.candidates)),
        key=lambda j: (validation_r[j] is None, -(validation_r[j] or 0.0), j),
    )
    return row | {
        "label": explained.candidates[chosen],
        "labels": [explained.candidates[j] for j in ranked[:3]],
        "score": choice.score,
        "score_reason": choice.reason,
        "validation_r": validation_r,
        "test_r": test_r,
        "chosen": chosen,
        "predicted": [_number(v) for v in predictions[chosen]],
        "simulation_reading": simulation.readings[chosen],
        "simulation_missing": int(simulation.missing[chosen]),
        "simulation_extra": int(simulation.extra[chosen]),
        "simulation_replies": [r for r in simulation.replies if r is not None],
    }


@dataclass
class _Task:
    """One (neuron, variant): its items (explain set and scoring sample, `key` naming each), the
    listing the explainer sees, and an error known before any request."""

    variant: str
    neuron: int
    items: pd.DataFrame
    listing: list[Item]
    error: str | None = None

    @property
    def scored(self) -> pd.DataFrame:
        return self.items[self.items["part"] != EXPLAIN]


def _activation_task(neuron: int, items: pd.DataFrame) -> _Task:
    shown = items[items["part"] == EXPLAIN]
    listing = [Item(c, int(q)) for c, q in zip(shown["caption"], shown["quantised"], strict=True)]
    return _Task(ACTIVATIONS, neuron, items.assign(key=items["image_id"]), listing)


def _weight_task(neuron: int, weights: dict[str, Any], settings: dict[str, Any]) -> _Task:
    items = class_sets(
        weights["weights"],
        weights["classes"],
        explain_top=settings["explain_classes"],
        score_items=settings["score_classes"],
        score_top_fraction=settings["score_top_fraction"],
        validation_fraction=settings["validation_fraction"],
        seed=settings["seed"],
    )
    shown = items[items["part"] == EXPLAIN]
    listing = [Item(c, int(q)) for c, q in zip(shown["item"], shown["quantised"], strict=True)]
    task = _Task(WEIGHTS, neuron, items.assign(key=items["item"]), listing)
    if not (np.asarray(weights["weights"]) > 0).any():
        # the reference would list its classes all at 0: nothing to explain, no request spent
        task.error = (
            "every class weight is 0 or below: the neuron only votes against classes, so its "
            "weights name nothing it detects"
        )
    return task


def _explain_all(
    explainer: Any, tasks: list[_Task], per_request: int, pool: ThreadPoolExecutor
) -> list[Explained]:
    """Every task's explanations: one request per neuron, or per group of `per_request`
    neurons of one variant; a task with a known error sends nothing."""
    groups = []
    for variant in (ACTIVATIONS, WEIGHTS):
        ready = [t for t in tasks if t.variant == variant and t.error is None]
        groups += [ready[i : i + per_request] for i in range(0, len(ready), per_request)]
    replies = pool.map(
        lambda group: explainer.explain_group(
            group[0].variant, [(t.neuron, t.listing) for t in group]
        ),
        groups,
    )
    found: dict[tuple[str, int], Explained] = {}
    for group, explained in zip(groups, replies, strict=True):
        for task, one in zip(group, explained, strict=True):
            found[(task.variant, task.neuron)] = one
    return [found.get((t.variant, t.neuron)) or Explained([], error=t.error) for t in tasks]


def _score(task: _Task, explained: Explained, paths: pd.Series, simulator: Any) -> dict[str, Any]:
    """Simulate each candidate on the task's scoring sample, choose and score."""
    from neuroscribe.backends.llm import LLMError
    from neuroscribe.backends.simulators import ProbeImage

    simulation, error = None, None
    scored = task.scored
    if explained.error is None:
        try:
            if task.variant == ACTIVATIONS:
                images = [
                    ProbeImage(i, str(paths[i]), c)
                    for i, c in zip(scored["image_id"], scored["caption"], strict=True)
                ]
                simulation = simulator.predict(explained.candidates, images)
            else:
                simulation = simulator.predict_classes(
                    explained.candidates, scored["item"].tolist()
                )
        except LLMError as err:
            error = f"simulation failed: {err}"
    return _row(task.neuron, task.variant, explained, task.items, simulation, error)


def explain_chunk(
    captions: str | Path,
    weights: str | Path,
    manifest: str | Path,
    out: str | Path,
    llm: dict[str, Any],
    explain: dict[str, Any],
    weight_sets: dict[str, Any],
    simulator: dict[str, Any],
    worlds: Sequence[tuple[str, str]],
    cache: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    max_failed_fraction: float = 1.0,
) -> None:
    """Explain, simulate and score every neuron of a chunk, from its captions (and, where the
    layer has them, its weights to the classes). Fails, once every usable reply is cached, when
    more than `max_failed_fraction` of the (neuron, variant) rows failed."""
    table = pd.read_parquet(captions)
    first = table.iloc[0]
    model, layer = str(first["model"]), str(first["layer"])
    neurons = sorted(int(n) for n in table["neuron"].unique())
    by_neuron = {int(n): g for n, g in table.groupby("neuron", sort=True)}
    weight_rows = read_tables([weights])
    weight_rows = {int(r["neuron"]): r for r in weight_rows.to_dict("records")}
    paths = pd.read_parquet(manifest, columns=["image_id", "path"]).set_index("image_id")["path"]
    with DiskCache(cache, "llm") as store:
        explainer = build_explainer(llm, explain, store, device, dtype)
        sim = build_simulator(simulator, llm, explainer, worlds, device, dtype)
        tasks = [_activation_task(n, by_neuron[n]) for n in neurons]
        tasks += [_weight_task(n, weight_rows[n], weight_sets) for n in neurons if n in weight_rows]
        # requests run concurrently (the client bounds them); an in-process model runs alone
        workers = llm.get("max_concurrency", 1) if llm["backend"] == "openai" else 1
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(tasks)))) as pool:
            explained = _explain_all(explainer, tasks, explain["neurons_per_request"], pool)
            rows = list(
                pool.map(
                    lambda pair: _score(pair[0], pair[1], paths, sim),
                    zip(tasks, explained, strict=True),
                )
            )
        client = getattr(explainer, "client", None)
        if client is not None:
            log.info("llm: %s", client.stats.as_dict())
    secrets = secret_values([llm.get("api_key_env")])
    for row in rows:
        row |= {
            "model": model,
            "layer": layer,
            "score_kind": SCORE_KIND,
            "explainer": explainer.id,
            "simulator": sim.id,
            "prompt_mode": explain["prompt_mode"] if llm["backend"] != "none" else None,
            "error": None if row["error"] is None else redact(row["error"], secrets),
            "raw_replies": [redact(t, secrets) for t in row["raw_replies"]],
            "simulation_replies": [redact(t, secrets) for t in row["simulation_replies"]],
        }
    check_failures(
        f"tellme of {model}/{layer} ({Path(out).stem})",
        [Failure(r["neuron"], f"{r['variant']}: {r['error']}") for r in rows if r["error"]],
        len(rows),
        max_failed_fraction,
        "The usable replies are cached; the failed neurons' replies are kept in the cache for "
        "audit but asked again on the next run.",
    )
    frame = pd.DataFrame(rows).sort_values(["neuron", "variant"], kind="stable")
    log.info(
        "tellme: %d neurons, %d rows (%d failed), %d explainer requests, %d cache hits, "
        "explainer %s, simulator %s",
        len(neurons),
        len(frame),
        int((frame["status"] == "failed").sum()),
        int(frame["llm_requests"].sum()),
        int(frame["llm_cache_hits"].sum()),
        explainer.id,
        sim.id,
    )
    write_table(frame, out, SCHEMAS / "tellme.schema.yaml")
