"""Procedural concept synthesis: phrases parse to world attributes, images show them, seeding is
stable per image, and phrases the world cannot draw fail with the vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from neuroscribe.backends.synthesizers import PROMPT_TEMPLATE, UnrenderableConcept, image_seed
from neuroscribe.demo.renderer import ProceduralSynthesizer, Synthesis, parse_concept
from neuroscribe.demo.world import COLOURS, SHAPES, SIZES, render_scene, shape_mask, tint

SIZE = 64


@pytest.fixture(scope="module")
def synth() -> ProceduralSynthesizer:
    return ProceduralSynthesizer(SIZE)


def _bytes(result: Synthesis) -> list[bytes]:
    return [image.tobytes() for image in result.images]


def _object_pixels_match(result: Synthesis) -> None:
    """Every image shows its scene's object: inside the shape only its colour and that colour's
    light tint, at least a few pixels of the full colour, and the colour nowhere else."""
    for image, scene in zip(result.images, result.scenes, strict=True):
        (obj,) = scene.objects
        pixels = np.asarray(image).reshape(-1, 3)
        mask = shape_mask(obj.shape, obj.box, SIZE).reshape(-1)
        full = (pixels == COLOURS[obj.colour]).all(1)
        light = (pixels == tint(COLOURS[obj.colour])).all(1)
        assert (full | light)[mask].all()
        assert full[mask].sum() >= 10
        assert not full[~mask].any()


@pytest.mark.parametrize(
    ("concept", "expected"),
    [
        ("red circle", {"shape": "circle", "colour": "red"}),
        (
            "a large blue striped square",
            {"shape": "square", "colour": "blue", "texture": "stripes", "size": "large"},
        ),
        ("dotted stars", {"shape": "star", "texture": "dots"}),
        ("green on a noisy background", {"colour": "green", "background": "noise"}),
        (
            "Small purple CROSSES, checked",
            {"shape": "cross", "colour": "purple", "size": "small", "texture": "checker"},
        ),
        ("noisy background", {"background": "noise"}),
        ("red circle on a plain background", {"shape": "circle", "background": "plain"}),
    ],
)
def test_images_show_the_named_attributes(
    synth: ProceduralSynthesizer, concept: str, expected: dict[str, str]
) -> None:
    result = synth.synthesize(concept, count=6, seed=0)
    assert result.concept == concept
    assert result.prompt == PROMPT_TEMPLATE.format(concept=concept)
    assert result.ignored_words == ()
    assert len(result.images) == len(result.seeds) == len(result.scenes) == 6
    for image, scene in zip(result.images, result.scenes, strict=True):
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        assert image.tobytes() == render_scene(scene, SIZE).tobytes()
        (obj,) = scene.objects
        got = {
            "shape": obj.shape,
            "colour": obj.colour,
            "texture": obj.texture,
            "size": obj.size,
            "background": scene.background,
        }
        assert {k: got[k] for k in expected} == expected
    _object_pixels_match(result)


def _images_and_scenes(synth: ProceduralSynthesizer, concept: str) -> tuple[list, list]:
    result = synth.synthesize(concept, count=5, seed=2)
    return result.images, result.scenes


def test_unnamed_attributes_vary(synth: ProceduralSynthesizer) -> None:
    scenes = synth.synthesize("green on a noisy background", count=12, seed=0).scenes
    assert len({s.objects[0].shape for s in scenes}) >= 3
    assert len({s.objects[0].texture for s in scenes}) >= 2
    assert {s.objects[0].size for s in scenes} <= {"medium", "large"}


def test_pixels_agree_with_shape_size_and_background(synth: ProceduralSynthesizer) -> None:
    # geometry checked without the world's mask: a circle covers its centre but not the corners
    # of its box, a square covers both
    for concept, corners_covered in (("red circle", False), ("large blue square", True)):
        result = synth.synthesize(concept, count=5, seed=1)
        colour = COLOURS[concept.split()[-2]]
        allowed = {colour, tint(colour)}
        for image, scene in zip(result.images, result.scenes, strict=True):
            pixels = np.asarray(image)
            x0, y0, x1, y1 = scene.objects[0].box
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) in allowed
            corners = [(x0, y0), (x1 - 1, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)]
            covered = [tuple(pixels[y, x]) in allowed for x, y in corners]
            assert all(covered) if corners_covered else not any(covered)
    for scene in _images_and_scenes(synth, "large square")[1]:
        side = scene.objects[0].box[2] - scene.objects[0].box[0]
        lo, hi = SIZES["large"]
        assert round(lo * SIZE) <= side <= round(hi * SIZE)
    # a noisy background is noisy, a plain one flat (outside the object)
    for concept, noisy in (
        ("circle on a noisy background", True),
        ("circle on a plain background", False),
    ):
        for image, scene in zip(*_images_and_scenes(synth, concept), strict=True):
            obj = scene.objects[0]
            outside = ~shape_mask(obj.shape, obj.box, SIZE)
            spread = np.asarray(image)[outside].astype(float).std(0).max()
            assert spread > 5 if noisy else spread == 0


def test_deterministic_per_image(synth: ProceduralSynthesizer) -> None:
    a = synth.synthesize("red circle", count=4, seed=7)
    assert _bytes(a) == _bytes(ProceduralSynthesizer(SIZE).synthesize("red circle", 4, seed=7))
    assert a.seeds == [image_seed(7, "red circle", i) for i in range(4)]
    assert len(set(a.seeds)) == 4
    # per-index seeding: asking for more images does not change the first ones
    longer = synth.synthesize("red circle", count=7, seed=7)
    assert _bytes(longer)[:4] == _bytes(a) and longer.seeds[:4] == a.seeds
    other = synth.synthesize("red circle", count=4, seed=8)
    assert all(x != y for x, y in zip(_bytes(a), _bytes(other), strict=True))
    # case and punctuation do not change the images, other concepts do
    assert _bytes(synth.synthesize("Red, circle", 4, seed=7)) == _bytes(a)
    assert synth.synthesize("blue circle", 4, seed=7).seeds != a.seeds
    assert synth.synthesize("red circle", 0, seed=7).images == []


def test_image_seed_is_stable() -> None:
    # a fixed value: Python's salted hash() would change it from one process to the next
    assert image_seed(0, "red circle", 0) == 31466598542182886
    assert 0 <= image_seed(2**40, "x", 10**6) < 2**63


def test_unknown_and_conflicting_words_are_reported(synth: ProceduralSynthesizer) -> None:
    assert synth.synthesize("shiny red circle", 2, seed=0).ignored_words == ("shiny",)
    # stop words (the paper's prompt words, articles) are not reported
    assert parse_concept("One realistic image of a circle with the stripes").ignored_words == ()
    parsed = parse_concept("circle square red blue")
    assert (parsed.shape, parsed.colour) == ("circle", "red")
    assert parsed.ignored_words == ("square", "blue")
    # synonyms of one value are no conflict
    assert parse_concept("dotted dots").ignored_words == ()
    # "plain" is a background only when it qualifies "background"
    assert parse_concept("plain red circle").fixed == {
        "shape": "circle",
        "colour": "red",
        "texture": "plain",
    }
    assert parse_concept("circle on a plain background").fixed == {
        "shape": "circle",
        "background": "plain",
    }
    assert {parse_concept(f"{s}s" if s != "cross" else "crosses").shape for s in SHAPES} == set(
        SHAPES
    )


@pytest.mark.parametrize("concept", ["quantum entanglement", "", "an image of the"])
def test_unrenderable_concept(synth: ProceduralSynthesizer, concept: str) -> None:
    with pytest.raises(UnrenderableConcept) as info:
        synth.synthesize(concept, count=2, seed=0)
    message = str(info.value)
    assert repr(concept) in message
    for word in ("circle", "red", "striped", "dotted", "checkered", "noisy", "gradient"):
        assert word in message
    assert isinstance(info.value, ValueError)


def test_id_and_arguments() -> None:
    assert ProceduralSynthesizer().id == "procedural:world-v1@64px"
    assert ProceduralSynthesizer(96).id == "procedural:world-v1@96px"
    assert ProceduralSynthesizer(96).synthesize("star", 1, seed=0).images[0].size == (96, 96)
    with pytest.raises(ValueError, match="too small"):
        ProceduralSynthesizer(4)
    with pytest.raises(ValueError, match="count"):
        ProceduralSynthesizer().synthesize("star", -1, seed=0)
