"""The built-in demo: a small probe set and a small CNN that the workflow makes itself."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from neuroscribe.io import atomic_path

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    box: tuple[int, int, int, int],
    fill: tuple[int, ...],
    background: tuple[int, ...],
) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, y0, cx + w, y1), fill=fill)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, fill=fill)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=background)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, str, str]:
    """One image: a coloured shape at a random size and place on a plain light background."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    image = Image.new("RGB", (size, size), background)
    side = int(rng.integers(size // 3, size * 3 // 4))
    x0 = int(rng.integers(0, size - side))
    y0 = int(rng.integers(0, size - side))
    _draw_shape(
        ImageDraw.Draw(image), shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour], background
    )
    return image, shape, colour


def render_probe(out_dir: str | Path, n_images: int, size: int, seed: int) -> None:
    """Render `n_images` PNGs into out_dir/{shape}/ (the shape is the label); deterministic for a seed."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    digits = max(5, math.ceil(math.log10(n_images + 1)))
    for i in range(n_images):
        image, shape, colour = render_image(rng, size)
        path = out / shape / f"{i:0{digits}d}-{colour}-{shape}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
    log.info("rendered %d demo images into %s", n_images, out)


class TinyCNN(nn.Module):
    """A small convolutional classifier: conv1 → conv2 → conv3 → global pool → fc."""

    def __init__(self, num_classes: int = len(SHAPES)) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

        self.conv1 = block(3, 16)
        self.conv2 = block(16, 32)
        self.conv3 = block(32, 64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_cnn(seed: int = 0) -> TinyCNN:
    """The demo target with seeded random weights (no download, same weights on every machine)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyCNN()
