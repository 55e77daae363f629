"""The demo target: a small CNN trained by the workflow on the demo world (see `world`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from neuroscribe.config import TargetSpec
from neuroscribe.demo.world import SHAPES, render_scene, scenes
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


def _dataset(
    n: int, size: int, seed: int, mean: list[float], std: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    drawn = scenes(n, size, seed)
    pixels = np.stack([np.asarray(render_scene(s, size)) for s in drawn])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    y = torch.tensor([SHAPES.index(s.label) for s in drawn])
    return x, y


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        predicted = torch.cat([model(batch).argmax(1) for batch in x.split(256)])
    return float((predicted == y).float().mean())


def train_target(
    target: TargetSpec,
    out: str | Path,
    metrics: str | Path,
    images: int = 3000,
    holdout: int = 600,
    epochs: int = 10,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Train the target (built from its spec, e.g. the demo CNN) to name the main shape of a
    scene, at its input size and normalisation; write its state_dict and metrics.

    Deterministic for a seed on a given machine and thread count.
    """
    torch.use_deterministic_algorithms(True)
    tf = target.transform
    x, y = _dataset(images, tf.crop, seed, list(tf.mean), list(tf.std))
    x_val, y_val = _dataset(
        holdout, tf.crop, seed + HOLDOUT_SEED_OFFSET, list(tf.mean), list(tf.std)
    )
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
    result = {
        "train_accuracy": _accuracy(model, x, y),
        "holdout_accuracy": _accuracy(model, x_val, y_val),
        "train_images": images,
        "holdout_images": holdout,
        "epochs": epochs,
        "seed": seed,
        "classes": list(SHAPES),
    }
    log.info("held-out accuracy %.3f on %d images", result["holdout_accuracy"], holdout)
    with atomic_path(out) as tmp:
        torch.save(model.state_dict(), tmp)
    with atomic_path(metrics) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result
