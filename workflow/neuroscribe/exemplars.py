"""Exemplars of a chunk of neurons: each neuron's top-K probe images from the merged layer file."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from neuroscribe.tables import write_table

log = logging.getLogger(__name__)


def chunk_exemplars(
    layer_h5: str | Path, model: str, layer: str, neurons: list[int], out: str | Path
) -> None:
    """One row per (neuron, rank) for the chunk's neurons, highest activation first.

    Whole images only for now: attention crops re-ranked by activation come with the
    Describe-and-Dissect exemplar stage.
    """
    with h5py.File(layer_h5, "r", locking=False) as h5:
        index = np.asarray(neurons, dtype=np.int64)
        top_rows = h5["topk_rows"][:][index]
        top_ids = h5["topk_ids"][:][index]
        top_values = h5["topk_values"][:][index]
    k = top_rows.shape[1]
    df = pd.DataFrame(
        {
            "model": model,
            "layer": layer,
            "neuron": np.repeat(index, k),
            "rank": np.tile(np.arange(k), len(index)),
            "image_id": top_ids.reshape(-1).astype(str),
            "row": top_rows.reshape(-1),
            "box": [None] * (len(index) * k),
            "activation": top_values.reshape(-1).astype(np.float64),
        }
    )
    write_table(df, out, "exemplars")
    log.info("%s/%s: exemplars of %d neurons", model, layer, len(index))
