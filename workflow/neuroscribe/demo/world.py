"""The demo world: procedurally rendered scenes of coloured, textured shapes with ground truth.

Every image comes with its annotation (objects with their attributes and boxes, the background,
a one-sentence caption), so the demo can check whether neuron descriptions are right.
Deterministic for a seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from neuroscribe.io import atomic_path
from neuroscribe.probe import images_folder

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
}
TEXTURES = ("plain", "stripes", "dots", "checker")
BACKGROUNDS = ("plain", "gradient", "noise")
# object side as a fraction of the image side
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.24, 0.32),
    "medium": (0.36, 0.46),
    "large": (0.52, 0.64),
}
TEXTURE_WORDS = {"plain": "", "stripes": "striped", "dots": "dotted", "checker": "checkered"}
BACKGROUND_WORDS = {"plain": "a plain", "gradient": "a gradient", "noise": "a noisy"}
TWO_OBJECT_RATE = 0.25


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    texture: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> WorldObject:
        """An object as an annotation row stores it ({shape, colour, texture, size, box})."""
        return cls(
            shape=record["shape"],
            colour=record["colour"],
            texture=record["texture"],
            size=record["size"],
            box=tuple(int(v) for v in record["box"]),  # type: ignore[arg-type]
        )

    def phrase(self) -> str:
        words = [self.size, self.colour, TEXTURE_WORDS[self.texture], self.shape]
        return " ".join(w for w in words if w)


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    background: str
    background_rgb: tuple[tuple[int, int, int], tuple[int, int, int]]
    noise_seed: int

    @property
    def caption(self) -> str:
        things = " and ".join(f"a {obj.phrase()}" for obj in self.objects)
        return f"{things} on {BACKGROUND_WORDS[self.background]} background"

    @property
    def label(self) -> str:
        """The class of the image: the shape of its main (first, largest) object."""
        return self.objects[0].shape


def _overlaps(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place(
    rng: np.random.Generator, size: int, size_name: str, taken: list[tuple[int, ...]]
) -> tuple[int, int, int, int] | None:
    lo, hi = SIZES[size_name]
    side = round(float(size * rng.uniform(lo, hi)))
    for _ in range(20):
        x0 = int(rng.integers(0, size - side + 1))
        y0 = int(rng.integers(0, size - side + 1))
        box = (x0, y0, x0 + side, y0 + side)
        if not any(_overlaps(box, t) for t in taken):
            return box
    return None


def light_rgb(rng: np.random.Generator) -> tuple[int, int, int]:
    """Background colours: light and low-saturation, never one of the object colours."""
    grey = int(rng.integers(200, 246))
    tint = rng.integers(-10, 11, size=3)
    return tuple(int(np.clip(grey + t, 0, 255)) for t in tint)  # type: ignore[return-value]


def sample_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw a scene: one object, sometimes a second smaller one that does not overlap it."""
    objects: list[WorldObject] = []
    main_size = ("medium", "large")[int(rng.integers(2))]
    sizes = [main_size]
    if rng.random() < TWO_OBJECT_RATE:
        sizes.append("small")
    taken: list[tuple[int, ...]] = []
    for size_name in sizes:
        box = _place(rng, size, size_name, taken)
        if box is None:
            break
        taken.append(box)
        objects.append(
            WorldObject(
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
                texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
                size=size_name,
                box=box,
            )
        )
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(
        objects=tuple(objects),
        background=background,
        background_rgb=(light_rgb(rng), light_rgb(rng)),
        noise_seed=int(rng.integers(2**31)),
    )


def shape_mask(shape: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Boolean [size, size] mask of one shape filling its box."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    x1, y1 = x1 - 1, y1 - 1
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, y0, cx + w, y1), fill=255)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=255)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + r * 0.08 + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    elif shape == "ring":
        draw.ellipse((x0, y0, x1, y1), fill=255)
        inner = r * 0.5
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return np.asarray(image) > 127


def texture_pattern(texture: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Boolean [size, size]: True where the texture shows the object's colour, else its light tint."""
    yy, xx = np.mgrid[0:size, 0:size]
    x0, y0, x1, _ = box
    period = max(4, (x1 - x0) // 4)
    u, v = xx - x0, yy - y0
    if texture == "plain":
        return np.ones((size, size), dtype=bool)
    if texture == "stripes":
        return (u // (period // 2)) % 2 == 0
    if texture == "checker":
        return ((u // (period // 2)) + (v // (period // 2))) % 2 == 0
    if texture == "dots":
        cu, cv = u % period - period / 2, v % period - period / 2
        return (cu**2 + cv**2) > (period * 0.3) ** 2
    raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")


def tint(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """The light version of a colour used between the stripes, dots and checks of a texture."""
    return tuple(int(c + (255 - c) * 0.65) for c in colour)  # type: ignore[return-value]


def _background(scene: Scene, size: int) -> np.ndarray:
    a, b = (np.array(c, dtype=np.float64) for c in scene.background_rgb)
    if scene.background == "plain":
        return np.broadcast_to(a, (size, size, 3)).copy()
    if scene.background == "gradient":
        t = np.linspace(0.0, 1.0, size)[:, None, None]
        ramp = a * (1 - t) + b * t
        horizontal = scene.noise_seed % 2 == 0
        return np.broadcast_to(
            ramp.transpose(1, 0, 2) if horizontal else ramp, (size, size, 3)
        ).copy()
    noise = np.random.default_rng(scene.noise_seed).normal(0, 14, size=(size, size, 3))
    return a + noise


def render_scene(scene: Scene, size: int) -> Image.Image:
    pixels = _background(scene, size)
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.box, size)
        on = texture_pattern(obj.texture, obj.box, size)
        colour = np.array(COLOURS[obj.colour], dtype=np.float64)
        light = np.array(tint(COLOURS[obj.colour]), dtype=np.float64)
        pixels[mask & on] = colour
        pixels[mask & ~on] = light
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), mode="RGB")


@dataclass(frozen=True)
class Spurious:
    """A planted shortcut for training: `background` goes with the class `shape`.

    A share `rate` of the scenes gets a background tied to its class (`background` when the main
    object is `shape`, one of the other backgrounds otherwise); the rest keep the clean world's
    background. So P(background | shape) = rate + (1 - rate) / B and P(background | other
    shape) = (1 - rate) / B, with B = len(BACKGROUNDS): 0.967 and 0.017 at rate 0.95.

    Which background matters: the demo CNN takes a noisy background as a shortcut (at rate 0.5
    to 0.7, more than half of what it calls a star on clean scenes is on noise), but barely
    tells a gradient from a plain background (light colours at 64 px), so a planted gradient
    mostly teaches it that stars are never on noise.
    """

    shape: str
    background: str
    rate: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"unknown background {self.background!r}; known: {', '.join(BACKGROUNDS)}"
            )
        if not 0 < self.rate <= 1:
            raise ValueError(f"spurious rate {self.rate} is not in (0, 1]")

    def rebackground(self, scene: Scene, rng: np.random.Generator) -> Scene:
        """The scene, its background tied to its class with probability `rate`."""
        if rng.random() >= self.rate:
            return scene
        if scene.label == self.shape:
            return replace(scene, background=self.background)
        others = [b for b in BACKGROUNDS if b != self.background]
        return replace(scene, background=others[int(rng.integers(len(others)))])


def scenes(n: int, size: int, seed: int, spurious: Spurious | None = None) -> list[Scene]:
    """`n` scenes of a seed; with `spurious`, the same scenes with backgrounds re-drawn for the
    planted shortcut (training only: the probe world is always the clean one)."""
    rng = np.random.default_rng(seed)
    drawn = [sample_scene(rng, size) for _ in range(n)]
    if spurious is None:
        return drawn
    # the shortcut draws from a stream of its own: the objects, colours and noise of every scene
    # stay those of the clean world, so a biased and a clean set differ in backgrounds alone
    bias_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    return [spurious.rebackground(scene, bias_rng) for scene in drawn]


def annotations_path(root: str | Path) -> Path:
    return Path(root) / "annotations.parquet"


def render_world(root: str | Path, n_images: int, size: int, seed: int) -> pd.DataFrame:
    """Render `n_images` scenes as PNGs into root/images/{label}/ and their annotations into
    root/annotations.parquet (one row per image: relpath, label, caption, background, objects)."""
    folder = images_folder(root)
    digits = max(5, len(str(n_images)))
    rows = []
    for i, scene in enumerate(scenes(n_images, size, seed)):
        relpath = f"{scene.label}/{i:0{digits}d}.png"
        path = folder / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            render_scene(scene, size).save(tmp, format="PNG")
        rows.append(
            {
                "relpath": relpath,
                "label": scene.label,
                "caption": scene.caption,
                "background": scene.background,
                "objects": [{**asdict(o), "box": list(o.box)} for o in scene.objects],
            }
        )
    table = pd.DataFrame(rows)
    with atomic_path(annotations_path(root)) as tmp:
        table.to_parquet(tmp, index=False)
    log.info("rendered %d scenes (%d px, seed %d) into %s", n_images, size, seed, folder)
    return table
