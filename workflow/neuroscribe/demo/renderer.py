"""The demo world's renderer (synthesizer `procedural`): a concept phrase drawn in the demo world.

`parse_concept` maps a phrase to world attributes (shape, colour, texture, size, background);
`ProceduralSynthesizer` renders single-object scenes with those attributes fixed and the others
random: deterministic, offline, with ground truth, and with the interface of a foundation-model
synthesizer (`id`, `check`, `draw`, see `backends.synthesizers.Synthesizer`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from neuroscribe.backends.synthesizers import PROMPT_TEMPLATE, UnrenderableConcept, image_seed
from neuroscribe.demo.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    TEXTURE_WORDS,
    TEXTURES,
    Scene,
    WorldObject,
    light_rgb,
    render_scene,
)
from neuroscribe.imagestore import ImageRequest
from neuroscribe.words import STOPWORDS, words

WORLD_VERSION = "world-v1"
# sizes of an object whose size the phrase does not name: those of a scene's main object
DEFAULT_SIZES = ("medium", "large")
MIN_IMAGE_SIZE = 16

# words that carry no attribute; they are neither used nor reported as ignored: the general stop
# words, and the words a prompt uses for the parts of a picture ("image of a striped shape on a
# plain background"), which name no attribute to the renderer but are concepts to a captioner
STOP_WORDS = STOPWORDS | frozenset(
    [
        "realistic",
        "images",
        "backgrounds",
        "shape",
        "shapes",
        "object",
        "objects",
        "pattern",
        "patterned",
        "texture",
        "textured",
        "coloured",
        "colored",
    ]
)

_SHAPE_WORDS: dict[str, str] = {shape: shape for shape in SHAPES}
_SHAPE_WORDS.update({("crosses" if s == "cross" else f"{s}s"): s for s in SHAPES})
_COLOUR_WORDS: dict[str, str] = {colour: colour for colour in COLOURS}
_TEXTURE_WORDS: dict[str, str] = {texture: texture for texture in TEXTURES}
_TEXTURE_WORDS.update({adj: texture for texture, adj in TEXTURE_WORDS.items() if adj})
_TEXTURE_WORDS.update(
    {"checked": "checker", "checkers": "checker", "checkerboard": "checker"}
    | {"stripe": "stripes", "stripy": "stripes", "dot": "dots", "spotted": "dots"}
)
_SIZE_WORDS: dict[str, str] = {s: s for s in SIZES} | {"big": "large", "tiny": "small"}
_BACKGROUND_WORDS: dict[str, str] = {"gradient": "gradient", "noisy": "noise", "noise": "noise"}
# "plain" names the background when it qualifies the word "background", else the texture
_PLAIN_BACKGROUND = re.compile(r"^backgrounds?$")


@dataclass(frozen=True)
class ParsedConcept:
    """The attributes a phrase fixes (None: drawn at random) and the words it did not understand."""

    shape: str | None = None
    colour: str | None = None
    texture: str | None = None
    size: str | None = None
    background: str | None = None
    ignored_words: tuple[str, ...] = ()

    @property
    def fixed(self) -> dict[str, str]:
        attrs = {
            "shape": self.shape,
            "colour": self.colour,
            "texture": self.texture,
            "size": self.size,
            "background": self.background,
        }
        return {k: v for k, v in attrs.items() if v is not None}


@dataclass(frozen=True)
class Synthesis:
    """Images of one concept; `seeds[i]` made `images[i]`. `scenes` is the ground truth of each
    image where the backend knows it (procedural rendering), empty otherwise."""

    concept: str
    prompt: str
    images: list[Image.Image]
    seeds: list[int]
    ignored_words: tuple[str, ...]
    scenes: list[Scene] = field(default_factory=list)


def vocabulary() -> str:
    """The words `parse_concept` understands, for error messages."""
    return (
        f"shapes: {', '.join(SHAPES)} (or plurals); colours: {', '.join(COLOURS)}; "
        f"textures: {', '.join(sorted(_TEXTURE_WORDS))}; "
        f"sizes: {', '.join(_SIZE_WORDS)}; "
        f"backgrounds: plain background, {', '.join(_BACKGROUND_WORDS)}"
    )


def parse_concept(concept: str) -> ParsedConcept:
    """Map a phrase to world attributes. A second word for an attribute already set to another
    value (e.g. "square" in "circle square") is not used and is reported with the unknown words.

    Raises UnrenderableConcept when the phrase names no shape, colour, texture, size or background.
    """
    tokens = words(concept)
    found: dict[str, str] = {}
    ignored: list[str] = []
    tables = (
        ("shape", _SHAPE_WORDS),
        ("colour", _COLOUR_WORDS),
        ("texture", _TEXTURE_WORDS),
        ("size", _SIZE_WORDS),
        ("background", _BACKGROUND_WORDS),
    )
    for i, word in enumerate(tokens):
        if word == "plain" and i + 1 < len(tokens) and _PLAIN_BACKGROUND.match(tokens[i + 1]):
            attr, value = "background", "plain"
        else:
            hit = next(((a, table[word]) for a, table in tables if word in table), None)
            if hit is None:
                if word not in STOP_WORDS:
                    ignored.append(word)
                continue
            attr, value = hit
        if found.setdefault(attr, value) != value:
            ignored.append(word)
    if not found:
        raise UnrenderableConcept(
            f"cannot render concept {concept!r}: it names nothing the demo world can draw; "
            f"known words: {vocabulary()}"
        )
    return ParsedConcept(**found, ignored_words=tuple(dict.fromkeys(ignored)))


def _box(rng: np.random.Generator, size: int, size_name: str) -> tuple[int, int, int, int]:
    lo, hi = SIZES[size_name]
    side = round(float(size * rng.uniform(lo, hi)))
    x0 = int(rng.integers(0, size - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    return (x0, y0, x0 + side, y0 + side)


def concept_scene(parsed: ParsedConcept, size: int, rng: np.random.Generator) -> Scene:
    """One single-object scene with the parsed attributes fixed and the others random."""
    # every draw happens whether or not the attribute is fixed, so fixing one attribute does not
    # shift the random stream of the others
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    size_name = DEFAULT_SIZES[int(rng.integers(len(DEFAULT_SIZES)))]
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    size_name = parsed.size or size_name
    obj = WorldObject(
        shape=parsed.shape or shape,
        colour=parsed.colour or colour,
        texture=parsed.texture or texture,
        size=size_name,
        box=_box(rng, size, size_name),
    )
    return Scene(
        objects=(obj,),
        background=parsed.background or background,
        background_rgb=(light_rgb(rng), light_rgb(rng)),
        noise_seed=int(rng.integers(2**31)),
    )


class ProceduralSynthesizer:
    """Renders a concept phrase in the demo world: deterministic, offline, with ground truth."""

    def __init__(self, size: int = 64) -> None:
        if size < MIN_IMAGE_SIZE:
            raise ValueError(f"image size {size} is too small; use at least {MIN_IMAGE_SIZE} px")
        self.size = size

    @property
    def id(self) -> str:
        return f"procedural:{WORLD_VERSION}@{self.size}px"

    def synthesize(self, concept: str, count: int, seed: int) -> Synthesis:
        """`count` images of `concept`; image i depends only on (seed, concept words, i)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        parsed = parse_concept(concept)
        # seeding on the normalised words: "Red circle" and "red circle" draw the same images
        key = " ".join(words(concept))
        seeds = [image_seed(seed, key, i) for i in range(count)]
        drawn = [concept_scene(parsed, self.size, np.random.default_rng(s)) for s in seeds]
        return Synthesis(
            concept=concept,
            prompt=PROMPT_TEMPLATE.format(concept=concept),
            images=[render_scene(scene, self.size) for scene in drawn],
            seeds=seeds,
            ignored_words=parsed.ignored_words,
            scenes=drawn,
        )

    def draw(self, requests: Sequence[ImageRequest]) -> list[Image.Image]:
        """One image per request, from its concept and seed (the image store's interface)."""
        return [
            render_scene(
                concept_scene(parse_concept(r.concept), self.size, np.random.default_rng(r.seed)),
                self.size,
            )
            for r in requests
        ]

    def check(self, concept: str) -> tuple[str, ...]:
        """The words of `concept` this backend ignores; UnrenderableConcept if it draws nothing."""
        return parse_concept(concept).ignored_words
