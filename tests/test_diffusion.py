"""Foundation-model backends on tiny random models: `DiffusersSynthesizer` loads a local Stable
Diffusion folder through the real diffusers code and draws seeded images that do not depend on
their batch, `ImageStore` keeps them by content and never redraws, and `ClipSimilarity` embeds
images with a local CLIP folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_diffusion import build_tiny_clip, build_tiny_sd

from neuroscribe.backends.similarity import ClipSimilarity
from neuroscribe.backends.synthesizers import PROMPT_TEMPLATE, DiffusersSynthesizer
from neuroscribe.imagestore import ImageRequest, ImageStore

SIZE = 32
STEPS = 2


def request(concept: str, seed: int) -> ImageRequest:
    return ImageRequest(concept, PROMPT_TEMPLATE.format(concept=concept), seed)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def synth(sd_folder: Path) -> DiffusersSynthesizer:
    return DiffusersSynthesizer(
        str(sd_folder), steps=STEPS, guidance=7.5, size=SIZE, device="cpu", dtype="float32"
    )


@pytest.fixture(scope="module")
def clip(clip_folder: Path) -> ClipSimilarity:
    return ClipSimilarity(str(clip_folder), device="cpu", dtype="float32")


class Spy:
    """Wraps a drawer and records every batch it is asked to draw."""

    def __init__(self, drawer: DiffusersSynthesizer) -> None:
        self.drawer = drawer
        self.calls: list[list[ImageRequest]] = []

    @property
    def id(self) -> str:
        return self.drawer.id

    def draw(self, requests: Sequence[ImageRequest]) -> list[Image.Image]:
        self.calls.append(list(requests))
        return self.drawer.draw(requests)


# --- DiffusersSynthesizer ---------------------------------------------------------------------


def test_loads_local_pipeline_and_draws_one_image_per_request(
    synth: DiffusersSynthesizer,
) -> None:
    from diffusers import StableDiffusionPipeline

    assert isinstance(synth.pipe, StableDiffusionPipeline)
    images = synth.draw([request("red circle", 1), request("a dog", 2), request("blue star", 3)])
    assert len(images) == 3
    for image in images:
        assert isinstance(image, Image.Image)
        assert image.size == (SIZE, SIZE)
        assert pixels(image).std() > 0  # not a blank image


def test_seed_fixes_the_image_whatever_the_batch(synth: DiffusersSynthesizer) -> None:
    target = request("red circle", 7)
    alone = synth.draw([target])[0]
    batched = synth.draw([request("a dog", 1), target, request("green square", 2)])
    # the same noise, so the same image; a batched matmul may round a pixel differently on some
    # CPUs (one value off by 1 of 3072 seen), which a different seed's image is nowhere near
    a, b = pixels(alone).astype(int), pixels(batched[1]).astype(int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.001
    again = synth.draw([target])[0]
    np.testing.assert_array_equal(pixels(alone), pixels(again))


def test_different_seeds_draw_different_images(synth: DiffusersSynthesizer) -> None:
    a, b = synth.draw([request("red circle", 1), request("red circle", 2)])
    assert not np.array_equal(pixels(a), pixels(b))


def test_id_names_every_setting(synth: DiffusersSynthesizer, sd_folder: Path) -> None:
    assert synth.id.startswith("diffusers:")
    assert str(sd_folder) in synth.id
    assert f"steps={STEPS}" in synth.id
    assert f"size={SIZE}" in synth.id
    assert "scheduler=default" in synth.id
    assert "dtype=float32" in synth.id


def test_unknown_scheduler_is_refused(sd_folder: Path) -> None:
    with pytest.raises(ValueError, match="NoSuchScheduler"):
        DiffusersSynthesizer(
            str(sd_folder), steps=STEPS, size=SIZE, scheduler="NoSuchScheduler", device="cpu"
        )


def test_model_class_is_refused_as_scheduler(sd_folder: Path) -> None:
    with pytest.raises(ValueError, match="AutoencoderKL"):
        DiffusersSynthesizer(
            str(sd_folder), steps=STEPS, size=SIZE, scheduler="AutoencoderKL", device="cpu"
        )


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_named_scheduler_loads_and_draws(sd_folder: Path, name: str) -> None:
    import diffusers

    synth = DiffusersSynthesizer(
        str(sd_folder), steps=STEPS, size=SIZE, scheduler=name, device="cpu", dtype="float32"
    )
    assert isinstance(synth.pipe.scheduler, getattr(diffusers, name))
    assert f"scheduler={name}" in synth.id
    (image,) = synth.draw([request("red circle", 1)])
    assert image.size == (SIZE, SIZE)


def test_draws_without_guidance_as_the_fast_preset_does(sd_folder: Path) -> None:
    # config/fast.yaml: one step, guidance 0 (a distilled model: one UNet pass per step)
    synth = DiffusersSynthesizer(str(sd_folder), steps=1, guidance=0.0, size=SIZE, device="cpu")
    calls = []
    forward = synth.pipe.unet.forward
    synth.pipe.unet.forward = lambda sample, *a, **k: (
        calls.append(len(sample)) or forward(sample, *a, **k)
    )
    images = synth.draw([request("red circle", 1), request("a dog", 2)])
    assert [image.size for image in images] == [(SIZE, SIZE)] * 2
    assert calls == [2]  # one pass over the batch, no unconditional copy
    assert "steps=1:guidance=0.0" in synth.id


# --- ImageStore ---------------------------------------------------------------------------------


def test_store_draws_each_image_once(synth: DiffusersSynthesizer, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    spy = Spy(synth)
    requests = [request("red circle", 1), request("red circle", 2), request("a dog", 1)]

    paths, drawn = store.ensure(spy, requests, batch_size=2)
    assert drawn == 3
    assert [len(batch) for batch in spy.calls] == [2, 1]
    assert len(set(paths)) == 3
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == (SIZE, SIZE)
    stored = {path: path.read_bytes() for path in paths}

    # the same requests: the same files, nothing drawn
    spy.calls.clear()
    again, drawn = store.ensure(spy, requests, batch_size=2)
    assert (again, drawn) == (paths, 0)
    assert spy.calls == []
    assert {path: path.read_bytes() for path in again} == stored

    # one new seed: exactly that image is drawn
    new = request("red circle", 3)
    more, drawn = store.ensure(spy, [*requests, new], batch_size=2)
    assert drawn == 1
    assert spy.calls == [[new]]
    assert more[:3] == paths
    assert more[3] not in paths

    # only the finished PNGs are left: no temporary files
    files = [p for p in store.root.rglob("*") if p.is_file()]
    assert sorted(files) == sorted(more)
    assert all(p.suffix == ".png" and not p.name.startswith(".") for p in files)


def test_stored_image_is_the_drawn_image(synth: DiffusersSynthesizer, tmp_path: Path) -> None:
    target = request("blue star", 5)
    (path,), _ = ImageStore(tmp_path).ensure(synth, [target])
    with Image.open(path) as stored:
        np.testing.assert_array_equal(pixels(stored), pixels(synth.draw([target])[0]))


# --- ClipSimilarity -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, size=(48, 40, 3), dtype=np.uint8)) for _ in range(3)
    ]


def test_clip_loads_local_folder(clip: ClipSimilarity, clip_folder: Path) -> None:
    from transformers import CLIPModel

    assert isinstance(clip.model, CLIPModel)
    assert clip.id.startswith("clip:")
    assert str(clip_folder) in clip.id


def test_clip_embeddings_are_unit_rows(clip: ClipSimilarity, images: list[Image.Image]) -> None:
    emb = clip.embed(images)
    assert emb.dtype == torch.float32
    assert emb.shape == (3, 16)  # projection_dim of the tiny CLIP
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    # a greyscale image is converted, not refused
    assert clip.embed([images[0].convert("L")]).shape == (1, 16)


def test_clip_similarity_of_an_image_with_itself_is_one(
    clip: ClipSimilarity, images: list[Image.Image]
) -> None:
    assert clip.similarity([images[0]], [images[0].copy()]) == pytest.approx(1.0, abs=1e-5)


def test_clip_similarity_is_symmetric(clip: ClipSimilarity, images: list[Image.Image]) -> None:
    a, b = images[:1], images[1:]
    assert clip.similarity(a, b) == pytest.approx(clip.similarity(b, a), abs=1e-6)
    assert clip.similarity(a, b) < 1.0 - 1e-4


def test_clip_refuses_empty_input(clip: ClipSimilarity, images: list[Image.Image]) -> None:
    with pytest.raises(ValueError, match="no images"):
        clip.embed([])
    with pytest.raises(ValueError, match="no images"):
        clip.similarity([], images)
