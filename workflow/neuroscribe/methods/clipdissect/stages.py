"""The `clipdissect` stage: one job per (model, layer), from the layer's merged activations.

Reads activations/{model}/{layer}.h5 (its `activations` [images, neurons] matrix of the pooled
activations of every probe image), builds the image-concept matrix of the probe images the
method may see, scores every neuron of the layer with soft-WPMI and writes one row per neuron:
its best concepts and their scores.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from neuroscribe.merge import stored_neurons
from neuroscribe.methods.clipdissect.concepts import load_concepts
from neuroscribe.methods.clipdissect.wpmi import WpmiSettings, best_concepts, soft_wpmi
from neuroscribe.tables import write_table

log = logging.getLogger(__name__)

SCHEMA = Path(__file__).resolve().parents[3] / "schemas" / "clipdissect.schema.yaml"
SCORE_KIND = "soft_wpmi"


def usable(h5: h5py.File) -> np.ndarray:
    """Positions (in the layer file's image order) of the probe images the method may use: all
    of them but those the merge held out for evaluation (its `heldout` dataset)."""
    n_images = len(h5["rows"])
    if "heldout" not in h5:  # merged before evaluation existed: nothing is held out
        return np.arange(n_images)
    return np.flatnonzero(~h5["heldout"][:])


def _decode(ids: np.ndarray) -> list[str]:
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


def image_text_matrix(
    backend: dict[str, Any],
    manifest: pd.DataFrame,
    manifest_path: str,
    image_rows: np.ndarray,
    image_ids: list[str],
    concepts: list[str],
    worlds: list[list[str]],
    cache: str,
    device: str,
    dtype: str,
) -> tuple[Any, str]:
    """sim [images, concepts] of the configured backend, and the id of what computed it."""
    from neuroscribe.methods.clipdissect import imagetext

    if backend["backend"] == "annotations":
        from neuroscribe.demo.annotations import load_annotations

        annotations = load_annotations([(name, folder) for name, folder in worlds])
        return imagetext.annotation_matrix(annotations, image_ids, concepts), "annotations"
    from neuroscribe.probe import file_digest

    return imagetext.clip_matrix(
        backend,
        manifest,
        file_digest(manifest_path),
        image_rows,
        concepts,
        cache,
        device,
        dtype,
    )


def describe_layer(
    layer_file: str,
    manifest: str,
    out: str,
    concepts: str,
    wordfreq_words: int,
    backend: dict[str, Any],
    scoring: dict[str, Any],
    worlds: list[list[str]],
    cache: str,
    device: str = "auto",
    dtype: str = "auto",
    keep: int = 10,
    labels: int = 3,
    memory_mb: float = 512,
) -> None:
    """Label every neuron of one layer with its best concept by soft-WPMI (`scoring`: top_k, a,
    lam, p_start, p_end, min_prob), from the probe images no held-out split keeps from it
    (`usable`)."""
    started = time.time()
    table = pd.read_parquet(manifest)
    words = load_concepts(concepts, wordfreq_words)
    settings = WpmiSettings.from_dict(scoring)
    with h5py.File(layer_file, "r", locking=False) as h5:
        model, layer = str(h5.attrs["model"]), str(h5.attrs["layer"])
        rows = h5["rows"][:]
        use = usable(h5)
        ids = _decode(h5["image_ids"][:])
        neurons = stored_neurons(h5)
        log.info(
            "%s/%s: %d neurons, %d of %d probe images (held-out ones left out), %d concepts (%s)",
            model,
            layer,
            len(neurons),
            len(use),
            len(rows),
            len(words),
            concepts,
        )
        sim, similarity_id = image_text_matrix(
            backend,
            table,
            manifest,
            rows[use],
            [ids[i] for i in use],
            words,
            worlds,
            cache,
            device,
            dtype,
        )
        scores = soft_wpmi(h5["activations"], sim, settings, images=use, memory_mb=memory_mb)
    index, values = best_concepts(scores, max(keep, labels))
    top = [[words[i] for i in row] for row in index]
    finite = np.isfinite(values[:, 0])
    frame = pd.DataFrame(
        {
            "model": model,
            "layer": layer,
            "neuron": neurons,
            "status": np.where(finite, "ok", "failed"),
            "error": [None if ok else "no finite soft-WPMI score" for ok in finite],
            "label": [t[0] if ok else None for t, ok in zip(top, finite, strict=True)],
            "labels": [t[:labels] if ok else [] for t, ok in zip(top, finite, strict=True)],
            "score": [float(v[0]) if ok else None for v, ok in zip(values, finite, strict=True)],
            "score_kind": SCORE_KIND,
            "concepts": [t[:keep] for t in top],
            "concept_scores": [[float(x) for x in v[:keep]] for v in values],
            "similarity_model": similarity_id,
            "concept_set": concepts,
            "images": len(use),
        }
    )
    write_table(frame, out, SCHEMA)
    log.info(
        "%s/%s: %d neurons labelled in %.1f s", model, layer, len(neurons), time.time() - started
    )
