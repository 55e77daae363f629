"""The demo target: a small CNN trained by the workflow on the demo world (see `world`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuroscribe.config import TargetSpec
from neuroscribe.demo.world import SHAPES, Scene, Spurious, render_scene, scenes
from neuroscribe.io import atomic_path
from neuroscribe.models import build_target

log = logging.getLogger(__name__)

# the held-out scenes are drawn from another stream of the same seed
HOLDOUT_SEED_OFFSET = 1_000_003


class TinyCNN(nn.Module):
    """A small convolutional classifier: conv1 → conv2 → conv3 → global pool → fc."""

    def __init__(self, num_classes: int = len(SHAPES)) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.conv1 = block(3, 16)
        self.conv2 = block(16, 32)
        self.conv3 = block(32, 64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_cnn(seed: int = 0) -> TinyCNN:
    """The demo target architecture with seeded initial weights (same on every machine)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyCNN()


# its output neurons name the world's shapes, in order (read by the evaluation's class names)
tiny_cnn.class_names = list(SHAPES)  # type: ignore[attr-defined]


def scene_tensors(
    drawn: list[Scene], size: int, mean: list[float], std: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered, normalised scenes [N, 3, size, size] and their class indices [N]."""
    pixels = np.stack([np.asarray(render_scene(s, size)) for s in drawn])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    y = torch.tensor([SHAPES.index(s.label) for s in drawn])
    return x, y


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The predicted class index of every image."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(batch).argmax(1) for batch in x.split(256)])


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x) == y).float().mean())


def _accuracy_by_background(
    model: nn.Module, drawn: list[Scene], x: torch.Tensor, y: torch.Tensor, spurious: Spurious
) -> dict[str, float | None]:
    """Accuracy on the scenes of the planted shape, per background (None: no such scene): a
    model that learned the shortcut misses the shape off its background."""
    correct = predict(model, x) == y
    result: dict[str, float | None] = {}
    for background in dict.fromkeys(s.background for s in drawn):
        hits = [
            bool(c)
            for s, c in zip(drawn, correct, strict=True)
            if s.label == spurious.shape and s.background == background
        ]
        result[background] = sum(hits) / len(hits) if hits else None
    return dict(sorted(result.items()))


def _unbiased_metrics(
    model: nn.Module,
    holdout: int,
    size: int,
    seed: int,
    mean: list[float],
    std: list[float],
    spurious: Spurious,
) -> dict[str, Any]:
    """Accuracy on clean held-out scenes, overall and on the planted shape by background."""
    drawn = scenes(holdout, size, seed)
    x, y = scene_tensors(drawn, size, mean, std)
    accuracy = _accuracy(model, x, y)
    by_background = _accuracy_by_background(model, drawn, x, y, spurious)
    log.info(
        "unbiased held-out accuracy %.3f; on %ss by background: %s",
        accuracy,
        spurious.shape,
        by_background,
    )
    return {
        "unbiased_holdout_accuracy": accuracy,
        "unbiased_shape_accuracy_by_background": by_background,
    }


def train_target(
    target: TargetSpec,
    out: str | Path,
    metrics: str | Path,
    images: int = 3000,
    holdout: int = 600,
    epochs: int = 10,
    seed: int = 0,
    batch_size: int = 64,
    spurious: Spurious | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the target (built from its spec, e.g. the demo CNN) to name the main shape of a
    scene, at its input size and normalisation; write its state_dict and metrics.

    With `spurious` ({shape, background, rate}, see world.Spurious) the training and held-out
    scenes carry a planted shortcut, and the metrics add the accuracy on clean held-out scenes
    (the same scenes on the clean world's backgrounds). Deterministic for a seed on a given
    machine and thread count.
    """
    torch.use_deterministic_algorithms(True)
    if isinstance(spurious, Mapping):
        spurious = Spurious(**spurious)
    tf = target.transform
    size, mean, std = tf.crop, list(tf.mean), list(tf.std)
    x, y = scene_tensors(scenes(images, size, seed, spurious), size, mean, std)
    val_seed = seed + HOLDOUT_SEED_OFFSET
    x_val, y_val = scene_tensors(scenes(holdout, size, val_seed, spurious), size, mean, std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_target(target, load_weights=False).module
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=3e-3, total_steps=epochs * ((images + batch_size - 1) // batch_size)
    )
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for index in torch.randperm(images, generator=order).split(batch_size):
            # one-vs-rest: each output logit learns to detect its own class on any image. Under
            # softmax cross-entropy a logit is only defined up to a per-image shift, so ranking
            # images by one raw logit (what describing an output neuron does) would be ill-posed.
            target = nn.functional.one_hot(y[index], len(SHAPES)).float()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x[index]), target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(index)
        log.info(
            "epoch %d/%d: train loss %.3f, held-out accuracy %.3f",
            epoch + 1,
            epochs,
            total / images,
            _accuracy(model, x_val, y_val),
        )
    holdout_accuracy = _accuracy(model, x_val, y_val)
    log.info("held-out accuracy %.3f on %d images", holdout_accuracy, holdout)
    unbiased = (
        {"unbiased_holdout_accuracy": holdout_accuracy}  # the clean world's holdout already
        if spurious is None
        else _unbiased_metrics(model, holdout, size, val_seed, mean, std, spurious)
    )
    result: dict[str, Any] = {
        "train_accuracy": _accuracy(model, x, y),
        # on held-out scenes of the training world (biased like it with `spurious`)
        "holdout_accuracy": holdout_accuracy,
        **unbiased,
        "train_images": images,
        "holdout_images": holdout,
        "epochs": epochs,
        "seed": seed,
        "classes": list(SHAPES),
        "spurious": asdict(spurious) if spurious else None,
    }
    with atomic_path(out) as tmp:
        torch.save(model.state_dict(), tmp)
    with atomic_path(metrics) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result
