"""Target-feature image similarity: unit-norm embeddings of the pipeline's preprocessing, cosine
matrices, and concept images that are alike score higher than unlike ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from neuroscribe.backends.similarity import TargetFeatureSimilarity
from neuroscribe.config import TargetSpec, Transform
from neuroscribe.demo.renderer import ProceduralSynthesizer
from neuroscribe.layers import LayerError
from neuroscribe.models import LoadedTarget, build_target

TRANSFORM = Transform(resize=64, crop=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def target() -> LoadedTarget:
    # the demo CNN with its seeded random initial weights: no training needed for these checks
    spec = TargetSpec(
        name="demo",
        spec="python:neuroscribe.demo.cnn:tiny_cnn",
        weights=None,
        transform=TRANSFORM,
        layers=(),
    )
    return build_target(spec)


@pytest.fixture(scope="module")
def sim(target: LoadedTarget) -> TargetFeatureSimilarity:
    return TargetFeatureSimilarity(target, TRANSFORM)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return ProceduralSynthesizer(64).synthesize("circle", count=5, seed=0).images


def test_embeddings_are_unit_norm_penultimate_features(
    sim: TargetFeatureSimilarity, target: LoadedTarget, images: list[Image.Image]
) -> None:
    assert sim.id == "target-features:penultimate"
    features = sim.embed(images)
    assert features.shape == (5, 64) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=1), torch.ones(5))
    # the same as the fc input computed by hand from the pixels with the transform's mean/std
    model = target.module
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    x = (x.float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        pooled = torch.flatten(model.pool(model.conv3(model.conv2(model.conv1(x)))), 1)
    torch.testing.assert_close(features, nn.functional.normalize(pooled, dim=1))
    # the capture hook is gone and the model still runs to its logits
    assert not model.fc._forward_pre_hooks
    with torch.inference_mode():
        assert target.call(x).shape == (5, 7)


def test_batching_and_image_modes_do_not_change_features(
    target: LoadedTarget, sim: TargetFeatureSimilarity, images: list[Image.Image]
) -> None:
    small_batches = TargetFeatureSimilarity(target, TRANSFORM, batch_size=2)
    torch.testing.assert_close(small_batches.embed(images), sim.embed(images))
    rgba = [im.convert("RGBA") for im in images]
    torch.testing.assert_close(sim.embed(rgba), sim.embed(images))
    with pytest.raises(ValueError, match="no images"):
        sim.embed([])


def test_matrix_and_self_similarity(
    sim: TargetFeatureSimilarity, images: list[Image.Image]
) -> None:
    # one image (or copies of it) against itself: exactly similar
    assert sim.similarity(images[:1], images[:1]) == pytest.approx(1.0, abs=1e-5)
    assert sim.similarity([images[0]] * 3, images[:1]) == pytest.approx(1.0, abs=1e-5)
    matrix = sim.matrix(images, images)
    assert matrix.shape == (5, 5)
    torch.testing.assert_close(matrix, matrix.T)
    torch.testing.assert_close(matrix.diagonal(), torch.ones(5))
    assert float(matrix.max()) <= 1 + 1e-5
    # a set against itself is the mean of all pairs, so below 1 for different images
    assert sim.similarity(images, images) == pytest.approx(float(matrix.mean()), abs=1e-6)
    assert sim.similarity(images, images) < 1 - 1e-4
    assert sim.matrix(images[:2], images).shape == (2, 5)
    torch.testing.assert_close(sim.matrix(images[:2], images), matrix[:2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_like_concepts_are_more_similar(sim: TargetFeatureSimilarity, seed: int) -> None:
    # holds for the random-init demo CNN (checked over several inits), with a margin of ~0.01
    synth = ProceduralSynthesizer(64)
    red_circles = synth.synthesize("red circle", 8, seed=seed).images
    more_red_circles = synth.synthesize("red circle", 8, seed=seed + 100).images
    blue_squares = synth.synthesize("blue square", 8, seed=seed).images
    alike = sim.similarity(red_circles, more_red_circles)
    unlike = sim.similarity(red_circles, blue_squares)
    assert alike > unlike + 0.005


def test_named_layer_gives_flattened_output(
    target: LoadedTarget, images: list[Image.Image]
) -> None:
    conv3 = TargetFeatureSimilarity(target, TRANSFORM, layer="conv3")
    assert conv3.id == "target-features:conv3"
    features = conv3.embed(images)
    # [N, C*H*W], not pooled: 64 channels on an 8x8 grid for 64 px input
    assert features.shape == (5, 64 * 8 * 8)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(5))
    assert conv3.similarity(images[:1], images[:1]) == pytest.approx(1.0, abs=1e-5)
    assert not target.module.conv3._forward_hooks


def test_bad_layers_are_named(target: LoadedTarget) -> None:
    with pytest.raises(LayerError, match="no layer 'conv9'; valid: conv1"):
        TargetFeatureSimilarity(target, TRANSFORM, layer="conv9")
    no_linear = LoadedTarget(nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Identity())
    with pytest.raises(LayerError, match=r"no torch\.nn\.Linear"):
        TargetFeatureSimilarity(no_linear, TRANSFORM)
