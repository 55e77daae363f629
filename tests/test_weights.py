"""Weights files of targets: sniffed at config time, checked safely before any GPU job, loaded
as tensors only (torch or .safetensors), and a hostile pickle never runs."""

from __future__ import annotations

import copy
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from torchvision.models import VisionTransformer

from conftest import REPO, run_snakemake, workflow_env
from neuroscribe.config import ConfigError, TargetSpec, targets_from_config, validate_config
from neuroscribe.demo.cnn import TinyCNN, tiny_cnn
from neuroscribe.models import build_target
from neuroscribe.weights import (
    WeightsError,
    check_weights,
    configured_weights_file,
    load_state_dict_file,
    sniff_weights,
)

DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
CNN = "python:neuroscribe.demo.cnn:tiny_cnn"


def _config(weights: str | None, spec: str = CNN, **top: Any) -> dict[str, Any]:
    """The demo config with a target that loads `weights` instead of being trained."""
    cfg = copy.deepcopy(DEMO)
    cfg["targets"] = cfg["targets"][:1]  # the clean CNN (the demo's second has a shortcut)
    target = cfg["targets"][0]
    target.pop("train")
    target.update(spec=spec, weights=weights)
    cfg.update(top)
    return cfg


def _target(weights: str | Path, spec: str = CNN) -> TargetSpec:
    cfg = validate_config(_config(str(weights), spec=spec))
    return targets_from_config(cfg)[0]


class _RunsAShellCommand:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.system, (self.command,))


def _save_torch_zip(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def _save_torch_legacy(obj: Any, path: Path) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _save_pickle(obj: Any, path: Path) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


# torch warns that pickle.dump's protocol 4 is not its own: that file is refused all the same
@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
@pytest.mark.parametrize("save", [_save_torch_zip, _save_torch_legacy, _save_pickle])
def test_a_hostile_pickle_is_refused_and_never_runs(
    tmp_path: Path, save: Callable[[Any, Path], None]
) -> None:
    sentinel = tmp_path / "SENTINEL"
    weights = tmp_path / "weights.pt"
    state = dict(tiny_cnn().state_dict())
    state["conv1.0.weight"] = _RunsAShellCommand(f"touch {sentinel}")
    save(state, weights)

    # it passes the sniff (it is a torch/pickle file), so the check and the jobs must refuse it
    target = _target(weights)
    for load in (
        lambda: check_weights(target, weights, tmp_path / "record.json"),
        lambda: build_target(target),  # what the activations/exemplars/scores jobs call
    ):
        with pytest.raises(WeightsError) as err:
            load()
        message = str(err.value)
        assert re.search(
            r"holds Python objects other than tensors \('(posix|os)\.system'\)", message
        )
        assert (
            "neuroscribe only loads tensors, because unpickling other objects can run code"
            in message
        )
        assert "torch.save(model.state_dict(), path) or as a .safetensors file" in message
        assert "weights_only=False" not in message
        # torch's own advice (to load with weights_only=False) is not chained into the log
        assert err.value.__cause__ is None and err.value.__suppress_context__
    assert not sentinel.exists()
    assert not (tmp_path / "record.json").exists()


@pytest.mark.parametrize(
    ("content", "looks_like"),
    [
        (b"hello, these are not weights\n", "it starts with 'hello, these are not weights'"),
        (b"", "it is empty"),
        (
            b"<!DOCTYPE html>\n<html><body>Access denied</body></html>",
            "it is an HTML page, e.g. an error page saved by a failed download",
        ),
        (b"\x7fELF\x02\x01\x01\x00" * 8, "it starts with the bytes 7f 45 4c 46 02 01 01 00"),
    ],
    ids=["text", "empty", "html", "binary"],
)
def test_a_file_that_is_not_weights_fails_config_validation(
    tmp_path: Path, content: bytes, looks_like: str
) -> None:
    weights = tmp_path / "weights.pt"
    weights.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        validate_config(_config(str(weights)))
    assert str(err.value) == (
        f"config key 'targets[0].weights': file '{weights}' is not a PyTorch or safetensors "
        f"weights file ({looks_like})"
    )


def test_the_sniff_accepts_each_weights_format(tmp_path: Path) -> None:
    state = tiny_cnn().state_dict()
    _save_torch_zip(state, tmp_path / "zip.pt")
    _save_torch_legacy(state, tmp_path / "legacy.pt")
    save_file(state, tmp_path / "w.safetensors")
    for name in ("zip.pt", "legacy.pt", "w.safetensors"):
        assert sniff_weights(tmp_path / name) is None, name


def _outputs(target: TargetSpec) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return build_target(target).call(x)


def test_safetensors_weights_give_the_same_model_as_the_torch_file(tmp_path: Path) -> None:
    state = tiny_cnn(seed=7).state_dict()
    torch.save(state, tmp_path / "w.pt")
    save_file(state, tmp_path / "w.safetensors")

    from_pt = _outputs(_target(tmp_path / "w.pt"))
    from_safetensors = _outputs(_target(tmp_path / "w.safetensors"))
    assert torch.equal(from_pt, from_safetensors)
    # the weights were loaded: the factory's own seed-0 weights give other outputs
    untrained = TargetSpec.from_dict(_target(tmp_path / "w.pt").to_dict() | {"weights": None})
    assert not torch.allclose(from_pt, _outputs(untrained))

    loaded = load_state_dict_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    record = check_weights(
        _target(tmp_path / "w.safetensors"), tmp_path / "w.safetensors", tmp_path / "r.json"
    )
    assert (record.format, record.tensors) == ("safetensors", len(state))
    assert (tmp_path / "r.json").exists()


def test_weights_of_another_model_list_the_mismatches(tmp_path: Path) -> None:
    torch.save(TinyCNN(num_classes=10).state_dict(), tmp_path / "ten_classes.pt")
    with pytest.raises(WeightsError) as err:
        check_weights(
            _target(tmp_path / "ten_classes.pt"), tmp_path / "ten_classes.pt", tmp_path / "r.json"
        )
    assert str(err.value) == (
        f"weights file '{tmp_path / 'ten_classes.pt'}' does not fit the model {CNN}: "
        "2 shape mismatch(es): fc.weight (file [10, 64], model [7, 64]), fc.bias (file [10], "
        "model [7]). Check that the target's spec names the architecture the weights were "
        "saved from."
    )

    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    target = _target(tmp_path / "vit.safetensors")
    for load in (
        lambda: check_weights(target, tmp_path / "vit.safetensors", tmp_path / "r.json"),
        lambda: build_target(target),
    ):
        with pytest.raises(WeightsError) as err:
            load()
        message = str(err.value)
        assert (
            "23 tensor(s) of the model missing from the file: conv1.0.weight, conv1.0.bias, "
            "conv1.1.weight, conv1.1.bias, conv1.1.running_mean, and 18 more" in message
        )
        # the file's order (safetensors sorts names), the first five, then the count
        assert re.search(
            r"32 tensor\(s\) the model does not have: class_token, [^;]*, and 27 more", message
        )


def test_a_training_checkpoint_or_ddp_state_dict_says_what_to_save(tmp_path: Path) -> None:
    state = tiny_cnn().state_dict()
    torch.save({"epoch": 3, "model": state, "optimizer": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(WeightsError, match=r"its entry 'model' looks like the state_dict"):
        load_state_dict_file(tmp_path / "ckpt.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    with pytest.raises(WeightsError, match=r"DataParallel/DDP wrapper; save model\.module"):
        check_weights(_target(tmp_path / "ddp.pt"), tmp_path / "ddp.pt", tmp_path / "r.json")


def test_timm_weights_files_are_checked_against_the_meta_device_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.safetensors")
    target = _target(tmp_path / "resnet.safetensors", spec="timm:test_resnet")
    assert configured_weights_file(target) == str(tmp_path / "resnet.safetensors")
    record = check_weights(target, tmp_path / "resnet.safetensors", tmp_path / "r.json")
    assert record.format == "safetensors" and record.tensors > 10

    other = _target(tmp_path / "resnet.safetensors", spec="timm:test_efficientnet")
    with pytest.raises(WeightsError, match=r"does not fit the model timm:test_efficientnet: \d+"):
        check_weights(other, tmp_path / "resnet.safetensors", tmp_path / "r.json")


def test_only_configured_weights_files_are_checked() -> None:
    def target(spec: str, weights: str | None, train: dict[str, int] | None = None) -> TargetSpec:
        base = targets_from_config(validate_config(copy.deepcopy(DEMO)))[0]
        return TargetSpec.from_dict(
            base.to_dict() | {"spec": spec, "weights": weights, "train": train}
        )

    assert configured_weights_file(target("torchvision:resnet18", "IMAGENET1K_V1")) is None
    assert configured_weights_file(target("timm:resnet18", "pretrained")) is None
    assert configured_weights_file(target(CNN, None)) is None
    assert configured_weights_file(target(CNN, "results/demo/models/x.pt", {"images": 10})) is None
    assert configured_weights_file(target(CNN, "w.pt")) == "w.pt"
    assert configured_weights_file(target("timm:resnet18", "w.safetensors")) == "w.safetensors"


# -- through the real Snakefile ---------------------------------------------------------------


def _write_config(tmp_path: Path, weights: str) -> Path:
    cfg = _config(weights)
    cfg["probe"]["datasets"][0]["n_images"] = 40
    cfg["targets"][0]["layers"] = ["conv2", "fc"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_the_dry_run_checks_weights_before_the_jobs_that_load_them(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello, I am a text file\n")
    bad = run_snakemake(
        tmp_path, _write_config(tmp_path, "notes.txt"), "-n", env=workflow_env(), check=False
    )
    assert bad.returncode != 0
    assert (
        "config key 'targets[0].weights': file 'notes.txt' is not a PyTorch or safetensors "
        "weights file (it starts with 'hello, I am a text file')" in bad.stdout + bad.stderr
    )

    save_file(tiny_cnn(seed=1).state_dict(), tmp_path / "cnn.safetensors")
    good = run_snakemake(
        tmp_path, _write_config(tmp_path, "cnn.safetensors"), "-n", env=workflow_env()
    )
    out = good.stdout + good.stderr
    assert re.search(r"^check_weights\s+1$", out, re.M)
    # every job that loads the weights waits for the check
    for rule in ("activations", "exemplars", "scores"):
        block = re.search(rf"rule {rule}:\n(.*?)\n\n", out, re.S)
        assert block is not None, rule
        assert "results/demo/inspect/shapenet.weights.json" in block.group(1), rule
