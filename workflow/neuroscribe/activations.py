"""Pooled activations: one forward pass per image shard for all layers, merged per layer with top-K."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from neuroscribe.config import LayerSpec, TargetSpec, Transform
from neuroscribe.io import atomic_path
from neuroscribe.merge import ID_DTYPE, layer_attrs
from neuroscribe.models import LayerRecorder, build_target
from neuroscribe.probe import load_rgb, shard_rows

log = logging.getLogger(__name__)


def image_transform(tf: Transform) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(tf.resize, antialias=True),
            transforms.CenterCrop(tf.crop),
            transforms.ToTensor(),
            transforms.Normalize(tf.mean, tf.std),
        ]
    )


class ProbeImages(Dataset):
    """Decoded, transformed probe images (decoding runs in DataLoader worker processes)."""

    def __init__(self, paths: list[str], tf: Transform) -> None:
        self.paths = paths
        self.transform = image_transform(tf)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            image = load_rgb(self.paths[i])
        except Exception as exc:
            raise RuntimeError(
                f"cannot read probe image {self.paths[i]} (it was readable when the manifest was "
                f"built): {exc}; rebuild the manifest"
            ) from exc
        return self.transform(image), i


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config device is 'cuda' but this node has no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


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
    paths = table["path"].to_numpy()[rows].tolist()
    dev = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, dev)
    log.info("shard %d/%d: %d images on %s (%s)", shard, n_shards, len(rows), dev, compute_dtype)

    with torch.device(dev):
        loaded = build_target(target)
    loaded.module.to(dev)
    recorder = LayerRecorder(loaded, layers)
    loader = DataLoader(
        ProbeImages(paths, target.transform),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    buffers: dict[str, np.ndarray] = {}
    done = 0
    with (
        torch.inference_mode(),
        _autocast(dev, compute_dtype),
        _progress(len(rows), f"shard {shard}") as bar,
    ):
        for images, _ in loader:
            pooled = recorder.run(images.to(dev, non_blocking=True))
            n = images.shape[0]
            for name, values in pooled.items():
                if name not in buffers:
                    buffers[name] = np.empty((len(rows), values.shape[1]), dtype=np.float16)
                buffers[name][done : done + n] = values.float().cpu().numpy()
            done += n
            bar.update(n)
    recorder.close()

    with atomic_path(out) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("rows", data=rows.astype(np.int64))
        h5.create_dataset("image_ids", data=table["image_id"].to_numpy()[rows].astype(ID_DTYPE))
        group = h5.create_group("layers")
        for layer in layers:
            data = buffers.get(layer.name, np.empty((0, 0), dtype=np.float16))
            overflow = int(np.isinf(data).sum())
            if overflow:
                log.warning(
                    "layer %s: %d activations exceed the float16 range", layer.name, overflow
                )
            ds = group.create_dataset(layer.name, data=data)
            ds.attrs.update(layer_attrs(target, layer))
        h5.attrs.update({"shard": shard, "n_shards": n_shards})
    log.info("wrote %s", out)
