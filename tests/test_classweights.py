"""Effective class weights of a layer's neurons (TeLLMe's weight-based explanations): the linear
path to the output, found by torch.fx or named in the config, multiplied out; random weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from neuroscribe import models
from neuroscribe.classweights import (
    WeightPath,
    WeightPathError,
    cache_file,
    check_weight_path,
    effective_weights,
    find_path,
)
from neuroscribe.config import ConfigError, LayerSpec, TargetSpec, Transform
from neuroscribe.demo.cnn import tiny_cnn
from neuroscribe.layers import LayerError

ALEXNET_CLASSIFIER = [
    "classifier.2",
    "classifier.3",
    "classifier.4",
    "classifier.5",
    "classifier.6",
]


@pytest.fixture(scope="module")
def alexnet() -> nn.Module:
    # 10 classes keep the product small; the hidden layers are AlexNet's own (4096)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.alexnet(weights=None, num_classes=10).eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None).eval()


def _weight(module: nn.Module, name: str) -> np.ndarray:
    return dict(module.named_modules())[name].weight.detach().numpy()


# -- found automatically ----------------------------------------------------------------------


def test_alexnet_classifier_layers_multiply_the_linear_weights(alexnet: nn.Module) -> None:
    path = find_path(alexnet, "classifier.1")
    assert path == WeightPath(
        "classifier.1",
        (
            "classifier.2: ReLU",
            "classifier.3: Dropout",
            "classifier.4: Linear",
            "classifier.5: ReLU",
            "classifier.6: Linear",
        ),
        ("classifier.4", "classifier.6"),
    )
    weights = effective_weights(alexnet, path)
    by_hand = (alexnet.classifier[6].weight @ alexnet.classifier[4].weight).detach().numpy()
    assert weights.dtype == np.float32 and weights.shape == (10, 4096)
    np.testing.assert_allclose(weights, by_hand, rtol=1e-5, atol=1e-7)

    path = find_path(alexnet, "classifier.4")
    assert path.steps == ("classifier.5: ReLU", "classifier.6: Linear")
    assert path.linears == ("classifier.6",)
    np.testing.assert_array_equal(
        effective_weights(alexnet, path), _weight(alexnet, "classifier.6")
    )


def test_resnet_last_stage_weights_are_the_fc_columns(resnet: nn.Module) -> None:
    path = find_path(resnet, "layer4")
    assert path.steps == ("avgpool: AdaptiveAvgPool2d", "torch.flatten", "fc: Linear")
    assert path.linears == ("fc",)
    weights = effective_weights(resnet, path)
    assert weights.shape == (1000, 512) and weights.dtype == np.float32
    np.testing.assert_array_equal(weights, _weight(resnet, "fc"))
    # the neuron count, when the caller knows it, is checked instead of guessed
    np.testing.assert_array_equal(effective_weights(resnet, path, neurons=512), weights)
    with pytest.raises(WeightPathError, match="has 256 neurons"):
        effective_weights(resnet, path, neurons=256)


def test_demo_cnn_conv3_weights_are_the_fc_weights() -> None:
    model = tiny_cnn()
    path = find_path(model, "conv3")
    assert path.steps == ("pool: AdaptiveAvgPool2d", "torch.flatten", "fc: Linear")
    np.testing.assert_array_equal(effective_weights(model, path), _weight(model, "fc"))


class Functional(nn.Module):
    """Global pooling, flattening, ReLU and dropout written as tensor methods and functions."""

    def __init__(self, head: str = "") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 4)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x.mean((2, 3)) if self.head != "maxpool" else x.amax((2, 3))
        x = x.view(x.size(0), -1)
        x = F.dropout(F.relu(self.fc1(x)), 0.5, self.training)
        x = self.fc2(x)
        return torch.softmax(x, 1) if self.head == "softmax" else x


def test_functional_steps_and_size_reads_are_followed() -> None:
    model = Functional().eval()
    path = find_path(model, "conv")
    assert path.steps == (
        "Tensor.mean",
        "Tensor.view",
        "fc1: Linear",
        "F.relu",
        "F.dropout",
        "fc2: Linear",
    )
    expected = (model.fc2.weight @ model.fc1.weight).detach().numpy()
    np.testing.assert_allclose(effective_weights(model, path), expected, rtol=1e-6)


@pytest.mark.parametrize(("head", "found"), [("softmax", "torch.softmax"), ("maxpool", "amax")])
def test_nonlinear_steps_are_rejected(head: str, found: str) -> None:
    with pytest.raises(WeightPathError, match=f"layer 'conv'.*comes .*{found}"):
        find_path(Functional(head), "conv")


# -- no linear path ---------------------------------------------------------------------------


def test_a_residual_stage_before_the_last_is_rejected(resnet: nn.Module) -> None:
    with pytest.raises(WeightPathError) as caught:
        find_path(resnet, "layer3")
    message = str(caught.value)
    assert "layer 'layer3'" in message
    assert "layer4.0.conv1: Conv2d" in message and "branches" in message
    assert "tellme.weights.path" in message
    assert isinstance(caught.value, LayerError) and isinstance(caught.value, ConfigError)


def test_a_non_global_pool_then_flatten_is_rejected(alexnet: nn.Module) -> None:
    with pytest.raises(
        WeightPathError,
        match=r"layer 'features'.*avgpool: AdaptiveAvgPool2d.*flattens a spatial map; "
        "per-channel weights are not defined",
    ):
        find_path(alexnet, "features")


def test_the_output_layer_has_no_class_weights(resnet: nn.Module) -> None:
    with pytest.raises(WeightPathError, match="layer 'fc' is the model's output: its neurons are"):
        find_path(resnet, "fc")


def test_a_path_without_linear_is_rejected() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Dropout())
    with pytest.raises(WeightPathError, match="has no Linear"):
        find_path(model, "0")


def test_an_unknown_layer_lists_close_names(resnet: nn.Module) -> None:
    with pytest.raises(WeightPathError, match="no layer 'layer5'; closest: layer"):
        find_path(resnet, "layer5")


class Dynamic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if x.sum() > 0:  # data-dependent control flow: not traceable
            x = -x
        return self.fc2(x)


def test_untraceable_models_ask_for_a_named_path() -> None:
    model = Dynamic()
    with pytest.raises(
        WeightPathError, match=r"layer 'fc1': tracing .* failed .*tellme\.weights\.path"
    ):
        find_path(model, "fc1")
    path = find_path(model, "fc1", ["fc2"])
    np.testing.assert_array_equal(effective_weights(model, path), _weight(model, "fc2"))


# -- named paths ------------------------------------------------------------------------------


def test_a_named_path_equals_the_traced_one(alexnet: nn.Module) -> None:
    named = find_path(alexnet, "classifier.1", ALEXNET_CLASSIFIER)
    traced = find_path(alexnet, "classifier.1")
    assert named == traced
    np.testing.assert_array_equal(
        effective_weights(alexnet, named), effective_weights(alexnet, traced)
    )


@pytest.mark.parametrize(
    ("named", "message"),
    [
        (["classifier.9"], "names 'classifier.9', which is not a module.*classifier.6"),
        (["features.0"], "names 'features.0', a Conv2d .*not linear.*classifier.4"),
        (["classifier.5"], "has no Linear"),
        (["classifier.1"], "the layer itself"),
        (["classifier.6", "classifier.4"], "'classifier.4' takes 4096 features but 'classifier.6'"),
    ],
)
def test_a_wrong_named_path_is_rejected(alexnet: nn.Module, named: list[str], message: str) -> None:
    with pytest.raises(WeightPathError, match=f"layer 'classifier.1': .*{message}"):
        find_path(alexnet, "classifier.1", named)


def test_a_named_path_that_flattens_a_spatial_map_is_rejected(alexnet: nn.Module) -> None:
    path = find_path(alexnet, "features", ["classifier.1", "classifier.4", "classifier.6"])
    with pytest.raises(WeightPathError, match="256 × 36 features: the path flattens a spatial map"):
        effective_weights(alexnet, path)


# -- parse time -------------------------------------------------------------------------------


def _target(spec: str, crop: int = 40) -> TargetSpec:
    return TargetSpec(
        name="t",
        spec=spec,
        weights=None,
        transform=Transform(crop, crop, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        layers=(LayerSpec("conv3", "all", "avg", "cls"),),
    )


def test_check_weight_path_caches_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _target("python:neuroscribe.demo.cnn:tiny_cnn")
    builds: list[str] = []
    real_build = models.build_target

    def build_once(spec: TargetSpec, load_weights: bool = True) -> Any:
        builds.append(str(torch.empty(0).device))
        assert len(builds) == 1, "the cached path should not build the model again"
        return real_build(spec, load_weights=load_weights)

    monkeypatch.setattr(models, "build_target", build_once)
    path = check_weight_path(target, "conv3", None, tmp_path)
    assert path == find_path(tiny_cnn(), "conv3")
    assert builds == ["meta"]
    cached = json.loads(cache_file(target, "conv3", tmp_path).read_text())
    assert cached["neurons"] == 64 and cached["path"]["linears"] == ["fc"]
    assert check_weight_path(target, "conv3", None, tmp_path) == path
    # another named path is another key: it is checked again (and here builds again, failing)
    with pytest.raises(AssertionError, match="should not build"):
        check_weight_path(target, "conv3", ["pool", "fc"], tmp_path)


def test_check_weight_path_errors_name_the_target(tmp_path: Path) -> None:
    target = _target("python:neuroscribe.demo.cnn:tiny_cnn")
    with pytest.raises(WeightPathError, match=r"target 't' \(python:.*\): layer 'conv2': .*conv3"):
        check_weight_path(target, "conv2", None, tmp_path)
    assert not cache_file(target, "conv2", tmp_path).exists()


def test_check_weight_path_checks_the_layer_size(tmp_path: Path) -> None:
    # a named path from AlexNet's features into its classifier skips the 6x6 pool: caught at
    # parse time from the layer's real shape, [256, 6, 6] at 224 px, on the meta device
    target = _target("torchvision:alexnet", crop=224)
    with pytest.raises(WeightPathError, match=r"target 't'.*256 neurons.*flattens a spatial map"):
        check_weight_path(
            target, "features", ["classifier.1", "classifier.4", "classifier.6"], tmp_path
        )
    path = check_weight_path(target, "classifier.1", None, tmp_path)
    assert path.linears == ("classifier.4", "classifier.6")
