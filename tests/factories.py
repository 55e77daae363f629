"""Tiny target models for tests, used as `python:<this file>:<factory>` targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.models import VisionTransformer


def small_vit() -> VisionTransformer:
    """A 2-block ViT on 32x32 inputs (tokens [B, 17, 32]), seeded so every process builds the same."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=5,
        )


def mixed_probe(root: Path, n_demo: int, odd_sizes: list[tuple[int, int]]) -> Path:
    """A probe folder under `root` of `n_demo` 48 px demo-world images and random-noise images of
    the given (width, height) sizes, and its manifest at root/manifest.parquet; returns root."""
    from neuroscribe.config import DatasetSpec
    from neuroscribe.demo.world import images_folder, render_world
    from neuroscribe.probe import build_manifest

    render_world(root / "world", n_images=n_demo, size=48, seed=5)
    images = images_folder(root / "world")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(odd_sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            images / f"odd{i}.png"
        )
    build_manifest(
        [DatasetSpec(name="p", type="folder", path=str(images))],
        root,
        root / "manifest.parquet",
        root / "rejected.parquet",
    )
    return root
