"""Exemplars of a chunk of neurons: top-K probe images and attention crops, re-ranked by activation.

For a layer with spatial maps, every top-K image of the chunk's neurons goes through the target
once (one batched pass for the whole chunk); each neuron's map on each of its images gives up to 4
attention crops (see `crops`); all crops of the chunk go through the target in one more batched
pass and are scored by their neuron's pooled activation; each neuron keeps the top-K of its
images and crops. Crops are stored as boxes; pixels are re-read when needed.

With `crop_squash` N (the reference code's 375), every top image is first resized to N x N
whatever its aspect ratio: the maps come from that squashed image, each box is scored on its
pixels resized to N x N, and the top images themselves are re-scored on their N x N view (from
the maps' own forward pass), so images and crops are ranked on the pixels that later stages
caption and embed (the table's `squash` column says so).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from neuroscribe.config import LayerSpec, TargetSpec
from neuroscribe.crops import Box, attention_boxes, input_box_to_image, squashed_box_to_image
from neuroscribe.merge import columns_of
from neuroscribe.progress import Resumed, finish_chunk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    neuron: int
    row: int
    image_id: str
    box: Box | None
    activation: float


def _top_images(layer_h5: str | Path, neurons: list[int]) -> list[list[Candidate]]:
    with h5py.File(layer_h5, "r", locking=False) as h5:
        index = columns_of(h5, neurons)
        rows = h5["topk_rows"][:][index]
        ids = h5["topk_ids"][:][index].astype(str)
        values = h5["topk_values"][:][index]
    return [
        [
            Candidate(n, int(r), str(i), None, float(v))
            for r, i, v in zip(rows[j], ids[j], values[j], strict=True)
        ]
        for j, n in enumerate(neurons)
    ]


def _ranked(candidates: list[Candidate], k: int) -> list[Candidate]:
    # highest activation first; ties: whole images before crops, then by row and box
    return sorted(candidates, key=lambda c: (-c.activation, c.box is not None, c.row, c.box or ()))[
        :k
    ]


def _crop_candidates(
    images: list[list[Candidate]],
    manifest: pd.DataFrame,
    target: TargetSpec,
    layer: LayerSpec,
    loaded: Any,
    batch_size: int,
    workers: int,
    compute_dtype: Any,
    regions: str = "connected-4",
    squash: int | None = None,
) -> list[list[Candidate]] | None:
    """Every neuron's candidates: its top images and their attention crops, scored; None for a
    layer without maps. With `squash`, the maps, the crops' scores and the top images' own
    scores are all of the images resized to squash x squash (see the module's doc)."""
    import torch

    from neuroscribe.activations import ProbeImages, forward_batches
    from neuroscribe.models import LayerRecorder, pool

    dev = next(loaded.module.parameters()).device
    channels = [group[0].neuron for group in images]
    rows = sorted({c.row for group in images for c in group})
    position = {row: i for i, row in enumerate(rows)}
    paths = manifest["path"].to_numpy()[rows]

    raw = LayerRecorder(loaded, [layer], pooled=False)
    maps: np.ndarray | None = None
    # with squash: the top images' pooled activations on their squashed view, [rows, chunk]
    whole = None if squash is None else np.empty((len(rows), len(channels)), dtype=np.float32)
    batches = forward_batches(
        raw,
        ProbeImages(paths, target.transform, squash=squash),
        target.transform,
        batch_size,
        workers,
        dev,
        compute_dtype,
    )
    for index, outputs in batches:
        out = outputs[layer.name]
        if out.ndim != 4:
            raw.close()
            log.info(
                "layer %s has no spatial map (output %s): no attention crops",
                layer.name,
                list(out.shape),
            )
            return None
        if maps is None:
            maps = np.empty((len(rows), len(channels), *out.shape[2:]), dtype=np.float32)
        maps[index.numpy()] = out[:, channels].float().cpu().numpy()
        if whole is not None:
            # pooled as a pooling recorder pools (the whole output, then the chunk's channels)
            whole[index.numpy()] = pool(out, layer)[:, channels].float().cpu().numpy()
    raw.close()
    assert maps is not None

    requests: list[tuple[int, int, Box]] = []  # (neuron position in chunk, row, image box)
    sizes = manifest[["width", "height"]].to_numpy()
    for j, group in enumerate(images):
        for cand in group:
            width, height = sizes[cand.row]
            side = target.transform.crop
            for box in attention_boxes(maps[position[cand.row], j], side, regions):
                if squash is None:
                    image_box = input_box_to_image(box, int(width), int(height), target.transform)
                else:  # the model input is of the squashed image: back to it, then to the image
                    on_squashed = input_box_to_image(box, squash, squash, target.transform)
                    image_box = squashed_box_to_image(on_squashed, int(width), int(height), squash)
                requests.append((j, cand.row, image_box))
    scores = np.empty(len(requests), dtype=np.float32)
    if requests:
        pooled = LayerRecorder(loaded, [layer])
        dataset = ProbeImages(
            manifest["path"].to_numpy()[[r for _, r, _ in requests]],
            target.transform,
            [b for _, _, b in requests],
            squash=squash,
        )
        which = torch.tensor([channels[j] for j, _, _ in requests])
        for index, outputs in forward_batches(
            pooled, dataset, target.transform, batch_size, workers, dev, compute_dtype
        ):
            picked = outputs[layer.name].float().cpu()[torch.arange(len(index)), which[index]]
            scores[index.numpy()] = picked.numpy()
        pooled.close()
    ids = manifest["image_id"].to_numpy()
    if whole is None:
        pools = [list(group) for group in images]
    else:
        pools = [
            [
                Candidate(c.neuron, c.row, c.image_id, None, float(whole[position[c.row], j]))
                for c in group
            ]
            for j, group in enumerate(images)
        ]
    for (j, row, box), score in zip(requests, scores, strict=True):
        pools[j].append(Candidate(channels[j], row, str(ids[row]), box, float(score)))
    log.info(
        "%d attention crops for %d neurons on %d images%s",
        len(requests),
        len(images),
        len(rows),
        "" if squash is None else f", all squashed to {squash} x {squash}",
    )
    return pools


def chunk_exemplars(
    layer_h5: str | Path,
    manifest: str | Path,
    target: TargetSpec,
    layer: str,
    neurons: list[int],
    out: str | Path,
    top_k: int,
    crops: bool = True,
    crop_regions: str = "connected-4",
    crop_squash: int | None = None,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
    dtype: str = "auto",
    save_every: int = 32,
) -> Resumed:
    """One row per (neuron, rank): the top-K of its images and attention crops. Neurons are done
    `save_every` at a time and kept in a progress record, so a killed job resumes. Without
    crops (a layer without a spatial map) it is a lookup in the merged file: no model, no torch.
    With `crop_squash` N, a layer with crops is ranked on N x N views (see the module's doc) and
    its rows say `squash` N; other layers are unchanged.
    """
    spec = target.layer(layer)
    probe = None
    if crops:
        probe = pd.read_parquet(manifest, columns=["image_id", "path", "width", "height"])

    @functools.cache
    def model() -> tuple[Any, Any]:  # loaded once, and only if some part is left to compute
        from neuroscribe.activations import load_on
        from neuroscribe.device import resolve_device, resolve_dtype

        dev = resolve_device(device)
        return load_on(target, dev), resolve_dtype(dtype, dev)

    def rows_of(part: list[int]) -> pd.DataFrame:
        images = _top_images(layer_h5, part)
        scored = None
        if probe is not None:
            loaded, compute_dtype = model()
            scored = _crop_candidates(
                images,
                probe,
                target,
                spec,
                loaded,
                batch_size,
                workers,
                compute_dtype,
                crop_regions,
                crop_squash,
            )
        # the squash column only where the pixels are squashed: other tables are as before
        squashed = {} if scored is None or crop_squash is None else {"squash": crop_squash}
        rows = []
        for j, group in enumerate(images):
            pool = scored[j] if scored is not None else group
            for rank, cand in enumerate(_ranked(pool, top_k)):
                rows.append(
                    {
                        "model": target.name,
                        "layer": layer,
                        "neuron": cand.neuron,
                        "rank": rank,
                        "image_id": cand.image_id,
                        "row": cand.row,
                        "box": None if cand.box is None else list(cand.box),
                        "activation": cand.activation,
                    }
                    | squashed
                )
        return pd.DataFrame(rows)

    args = {
        "target": target.to_dict(),
        "layer": layer,
        "neurons": list(neurons),
        "top_k": top_k,
        "crops": crops,
        "crop_regions": crop_regions,
        "device": device,
        "dtype": dtype,
    }
    if crops and crop_squash is not None:  # only when it applies: other records stay valid
        args["crop_squash"] = crop_squash
    # retrained weights under the same path void the record too
    inputs = [layer_h5, manifest, *target.weights_files()]
    resumed = finish_chunk(out, args, inputs, neurons, save_every, rows_of, "exemplars")
    log.info("%s/%s: exemplars of %d neurons", target.name, layer, len(neurons))
    return resumed
