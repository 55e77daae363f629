"""Pooled activations: one forward pass per image shard for all layers, merged per layer with top-K."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from neuroscribe.backends.captioners import exemplar_view
from neuroscribe.config import LayerSpec, TargetSpec, Transform
from neuroscribe.device import resolve_device, resolve_dtype
from neuroscribe.fanout import select_neurons
from neuroscribe.io import atomic_path
from neuroscribe.merge import ID_DTYPE, layer_attrs
from neuroscribe.models import LayerRecorder, LoadedTarget, build_target
from neuroscribe.probe import load_rgb, shard_rows

log = logging.getLogger(__name__)


def image_transform(tf: Transform) -> transforms.Compose:
    """Resize and centre-crop to a uint8 [3, crop, crop] tensor; `Normalizer` does the rest."""
    return transforms.Compose(
        [
            transforms.Resize(tf.resize, antialias=True),
            transforms.CenterCrop(tf.crop),
            transforms.PILToTensor(),
        ]
    )


class Normalizer:
    """uint8 batch → float, scaled to [0, 1] and normalised with the transform's mean/std.

    Done on the compute device: the DataLoader moves uint8 images (4x less shared memory and
    host-to-device traffic than float32), and the GPU does the arithmetic.
    """

    def __init__(self, tf: Transform, device: torch.device) -> None:
        self.mean = torch.tensor(tf.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(tf.std, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std


class ProbeImages(Dataset):
    """Decoded, resized, cropped probe images as uint8 (decoding runs in DataLoader workers).

    An item is an exemplar's view (`exemplar_view`): the image or its box, squashed to
    squash x squash pixels when `squash` (one size for all items, or one per item) says so,
    then the target's transform."""

    def __init__(
        self,
        paths: Sequence[str | bytes] | np.ndarray,
        tf: Transform,
        boxes: Sequence[tuple[int, int, int, int] | None] | None = None,
        squash: int | Sequence[int | None] | None = None,
    ) -> None:
        self.paths = paths
        self.transform = image_transform(tf)
        # optional crop box per item (image pixels), applied before the transform
        self.boxes = boxes
        self.squash = squash

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            image = load_rgb(os.fsdecode(self.paths[i]))
        except Exception as exc:
            raise RuntimeError(
                f"cannot read probe image {os.fsdecode(self.paths[i])} (it was readable when the manifest was "
                f"built): {exc}; rebuild the manifest"
            ) from exc
        box = None if self.boxes is None else self.boxes[i]
        squash = self.squash
        if squash is not None and not isinstance(squash, int | np.integer):
            squash = squash[i]
        return self.transform(exemplar_view(image, box, squash)), i


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _progress(total: int, desc: str) -> tqdm:
    # in a job log (not a terminal) a bar redrawn every 0.1 s would flood the file
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total, desc=desc, unit="img", file=sys.stderr, mininterval=0.1 if interactive else 5
    )


def load_on(target: TargetSpec, dev: torch.device) -> LoadedTarget:
    """Build the target with its weights, directly on the compute device."""
    with torch.device(dev):
        loaded = build_target(target)
    loaded.module.to(dev)
    return loaded


def forward_batches(
    recorder: LayerRecorder,
    dataset: ProbeImages,
    tf: Transform,
    batch_size: int,
    workers: int,
    dev: torch.device,
    compute_dtype: torch.dtype,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(item indices, hooked outputs) per batch: decoding in DataLoader workers, one forward pass
    per batch for every hooked layer."""
    normalize = Normalizer(tf, dev)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    with torch.inference_mode(), _autocast(dev, compute_dtype):
        for images, index in loader:
            yield index, recorder.run(normalize(images.to(dev, non_blocking=True)))


def _progress_over(
    batches: Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]], total: int, desc: str
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    with _progress(total, desc) as bar:
        for index, outputs in batches:
            yield index, outputs
            bar.update(len(index))


def extract_shard(
    manifest: str | Path,
    target: TargetSpec,
    layers: list[LayerSpec],
    shard: int,
    n_shards: int,
    out: str | Path,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Run the target once over one shard of the probe, hooking every layer; write pooled
    activations [images, neurons] (float16) per layer to one HDF5 file."""
    table = pd.read_parquet(manifest, columns=["image_id", "path"])
    rows = shard_rows(len(table), shard, n_shards)
    # one numpy bytes array, not a list of Python str: forked workers read it without touching
    # (and so copying) a refcounted object per image, at one byte per character
    paths = np.array([os.fsencode(p) for p in table["path"].to_numpy()[rows]], dtype=bytes)
    dev = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, dev)
    log.info("shard %d/%d: %d images on %s (%s)", shard, n_shards, len(rows), dev, compute_dtype)

    loaded = load_on(target, dev)
    recorder = LayerRecorder(loaded, layers)
    buffers: dict[str, np.ndarray] = {}
    overflow: dict[str, int] = {}
    # only the described neurons are stored (their indices in `neurons/{layer}`)
    columns: dict[str, np.ndarray] = {}
    done = 0
    dataset = ProbeImages(paths, target.transform)
    batches = forward_batches(
        recorder, dataset, target.transform, batch_size, workers, dev, compute_dtype
    )
    for _, pooled in _progress_over(batches, len(rows), f"shard {shard}"):
        n = next(iter(pooled.values())).shape[0]
        for layer in layers:
            name, values = layer.name, pooled[layer.name]
            if name not in buffers:
                columns[name] = np.asarray(
                    select_neurons(layer.neurons, values.shape[1], f"layer {name}"), dtype=np.int64
                )
                buffers[name] = np.empty((len(rows), len(columns[name])), dtype=np.float16)
                overflow[name] = 0
            if len(columns[name]) < values.shape[1]:  # a subset: gather it on the device
                values = values[:, torch.from_numpy(columns[name]).to(values.device)]
            batch = values.to(torch.float16).cpu().numpy()
            overflow[name] += int(np.isinf(batch).sum())
            buffers[name][done : done + n] = batch
        done += n
    recorder.close()

    with atomic_path(out) as tmp, h5py.File(tmp, "w", locking=False) as h5:
        h5.create_dataset("rows", data=rows.astype(np.int64))
        h5.create_dataset("image_ids", data=table["image_id"].to_numpy()[rows].astype(ID_DTYPE))
        group = h5.create_group("layers")
        neurons = h5.create_group("neurons")
        for layer in layers:
            data = buffers.get(layer.name, np.empty((0, 0), dtype=np.float16))
            neurons.create_dataset(
                layer.name, data=columns.get(layer.name, np.empty(0, dtype=np.int64))
            )
            if overflow.get(layer.name):
                log.warning(
                    "layer %s: %d activations exceed the float16 range",
                    layer.name,
                    overflow[layer.name],
                )
            ds = group.create_dataset(layer.name, data=data)
            ds.attrs.update(layer_attrs(target, layer))
        h5.attrs.update({"shard": shard, "n_shards": n_shards})
    log.info("wrote %s", out)
