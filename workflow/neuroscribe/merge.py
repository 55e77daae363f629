"""Per-layer merge of activation shards: the full [images, neurons] matrix and each neuron's top-K.

No torch here, so a merge job starts fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np

from neuroscribe import __version__
from neuroscribe.config import LayerSpec, TargetSpec
from neuroscribe.io import atomic_path

log = logging.getLogger(__name__)

# A column block of this many neurons is merged at a time, so merge memory is images × block.
MERGE_BLOCK = 256
# Rows per HDF5 chunk of the merged matrix; chunks are one neuron wide for per-neuron reads.
ROWS_PER_CHUNK = 1 << 16
ID_DTYPE = "S16"


def layer_attrs(target: TargetSpec, layer: LayerSpec) -> dict[str, str]:
    return {
        "model": target.name,
        "spec": target.spec,
        "weights": target.weights or "",
        "layer": layer.name,
        "pooling": layer.pooling,
        "tokens": layer.tokens,
        "transform": json.dumps(
            {
                "resize": target.transform.resize,
                "crop": target.transform.crop,
                "mean": list(target.transform.mean),
                "std": list(target.transform.std),
            }
        ),
        "neuroscribe_version": __version__,
    }


def stored_neurons(h5: h5py.File, layer: str | None = None) -> np.ndarray:
    """The neuron index of each stored column: a merged layer file's `neurons`, or a shard's
    `neurons/{layer}`; files written before subsets were stored hold every neuron."""
    key = "neurons" if layer is None else f"neurons/{layer}"
    if key in h5:
        return h5[key][:].astype(np.int64)
    width = h5["activations" if layer is None else f"layers/{layer}"].shape[1]
    return np.arange(width, dtype=np.int64)


def columns_of(h5: h5py.File, neurons: list[int]) -> np.ndarray:
    """Column positions of `neurons` in a merged layer file (an error names any not stored)."""
    position = {int(n): i for i, n in enumerate(stored_neurons(h5))}
    missing = [n for n in neurons if n not in position]
    if missing:
        raise ValueError(
            f"{h5.filename}: neurons {missing[:10]} are not stored (it holds the neurons the "
            "config described when it was written); delete it to rebuild it for this config"
        )
    return np.asarray([position[n] for n in neurons], dtype=np.int64)


def _topk(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows per column of [images, neurons], ties broken by the lower row (deterministic)."""
    values = block.astype(np.float32)
    values[np.isnan(values)] = -np.inf
    order = np.argsort(-values, axis=0, kind="stable")[:k]
    return order.T, np.take_along_axis(values, order, axis=0).T


def merge_layer(
    shards: list[str | Path],
    target: TargetSpec,
    layer: LayerSpec,
    out: str | Path,
    top_k: int,
    holdout: float = 0.0,
) -> None:
    """Concatenate one layer's shard matrices into [images, neurons] and find each neuron's top-K
    among the images not held out for evaluation (`holdout`: their share; 0 holds none out)."""
    from neuroscribe.evaluation.split import heldout_mask

    handles = [h5py.File(p, "r", locking=False) for p in shards]
    try:
        stored = {tuple(stored_neurons(h, layer.name)) for h in handles if len(h["rows"])}
        if len(stored) != 1:
            raise ValueError(
                f"layer {layer.name}: shards disagree on the neurons they store "
                f"({sorted(len(s) for s in stored)} columns); rebuild the activations"
            )
        (neurons,) = stored
        n_neurons = len(neurons)
        rows = np.concatenate([h["rows"][:] for h in handles])
        ids = np.concatenate([h["image_ids"][:] for h in handles])
        n_images = len(rows)
        heldout = heldout_mask(ids, holdout)
        k = min(top_k, n_images - int(heldout.sum()))
        with atomic_path(out) as tmp, h5py.File(tmp, "w", locking=False) as h5:
            matrix = h5.create_dataset(
                "activations",
                shape=(n_images, n_neurons),
                dtype=np.float16,
                chunks=(min(n_images, ROWS_PER_CHUNK), 1),
            )
            top_rows = np.empty((n_neurons, k), dtype=np.int64)
            top_values = np.empty((n_neurons, k), dtype=np.float32)
            for start in range(0, n_neurons, MERGE_BLOCK):
                stop = min(start + MERGE_BLOCK, n_neurons)
                block = np.concatenate(
                    [h["layers"][layer.name][:, start:stop] for h in handles if len(h["rows"])]
                )
                matrix[:, start:stop] = block
                # no method may see a held-out image: none is among the top-K
                order, values = _topk(np.where(heldout[:, None], np.nan, block), k)
                top_rows[start:stop] = rows[order]
                top_values[start:stop] = values
            position = np.empty(rows.max() + 1, dtype=np.int64)
            position[rows] = np.arange(n_images)
            h5.create_dataset("neurons", data=np.asarray(neurons, dtype=np.int64))
            h5.create_dataset("rows", data=rows)
            h5.create_dataset("image_ids", data=ids)
            h5.create_dataset("heldout", data=heldout)
            h5.create_dataset("topk_rows", data=top_rows)
            h5.create_dataset("topk_ids", data=ids[position[top_rows]])
            h5.create_dataset("topk_values", data=top_values)
            h5.attrs.update(layer_attrs(target, layer))
            h5.attrs.update(
                {"n_images": n_images, "n_neurons": n_neurons, "top_k": k, "holdout": holdout}
            )
    finally:
        for h in handles:
            h.close()
    log.info(
        "merged %d shards of %s: %d images × %d neurons",
        len(shards),
        layer.name,
        n_images,
        n_neurons,
    )
