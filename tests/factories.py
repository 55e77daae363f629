"""Tiny target models for tests, used as `python:<this file>:<factory>` targets."""

from __future__ import annotations

import torch
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
