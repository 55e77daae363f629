"""Config validation: defaults, and one exact, actionable message per kind of mistake."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO
from neuroscribe.config import (
    ConfigError,
    derive,
    run_name,
    targets_from_config,
    validate_config,
)
from neuroscribe.fanout import build_layout, select_neurons
from neuroscribe.inspection import LayerError, check_layers, inspect_target

DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def demo(**top: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(DEMO)
    cfg.update(top)
    return cfg


def test_demo_config_is_valid_and_defaults_are_filled() -> None:
    cfg = validate_config(demo())
    assert cfg["methods"] == ["topk", "dnd", "clipdissect", "tellme", "texplain"]
    assert cfg["evaluation"]["enabled"] and cfg["evaluation"]["holdout"] == 0.2
    assert cfg["captioner"]["backend"] == "annotations" and cfg["llm"]["backend"] == "none"
    assert cfg["dnd"]["prompt_mode"] == "batched" and cfg["dnd"]["candidates"] == 5
    assert cfg["dtype"] == "auto"
    assert cfg["targets"][0]["pooling"] == "avg"
    assert cfg["targets"][0]["tokens"] == "cls"
    assert cfg["targets"][0]["weights"] is None
    # the second target: the same CNN trained with a planted shortcut (TExplain should find it)
    assert cfg["targets"][1]["train"]["spurious"] == {
        "shape": "star",
        "background": "noise",
        "rate": 0.6,
    }
    # a partly given resources block keeps the defaults of the keys it leaves out
    assert cfg["resources"]["activations"] == {
        "cpus": 1,
        "mem_mb": 3000,
        "runtime": 10,
        "gpus": None,
    }
    assert cfg["resources"]["merge"]["cpus"] == 1


def test_real_config_is_valid_once_the_imagenet_path_is_set(tmp_path: Path) -> None:
    # whatever path the shipped file holds (users may edit it in place): a missing folder is
    # named, and the file validates once the folder exists
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["probe"]["datasets"][0]["path"] = str(tmp_path / "val")
    with pytest.raises(ConfigError) as err:
        validate_config(copy.deepcopy(cfg))
    assert str(err.value) == (
        f"config key 'probe.datasets[0].path': folder '{tmp_path / 'val'}' of dataset "
        "'imagenet-val' does not exist; set it to your image folder in the config file"
    )
    cfg["probe"]["datasets"][0]["path"] = str(tmp_path)
    validated = validate_config(cfg)
    target = targets_from_config(validated)[0]
    assert target.spec == "torchvision:resnet50" and target.weights == "IMAGENET1K_V2"
    assert [layer.name for layer in target.layers] == ["layer1", "layer2", "layer3", "layer4", "fc"]


def test_fast_preset_changes_only_the_text_to_image_model_and_its_steps(tmp_path: Path) -> None:
    from snakemake.utils import update_config  # how `--configfile a.yaml b.yaml` layers files

    paper = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    paper["probe"]["datasets"][0]["path"] = str(tmp_path)
    fast = copy.deepcopy(paper)
    update_config(fast, yaml.safe_load((REPO / "config" / "fast.yaml").read_text()))
    paper, fast = validate_config(paper), validate_config(fast)
    changed = {
        k: (paper["dnd"]["synthesizer"][k], v) for k, v in fast["dnd"]["synthesizer"].items()
    }
    changed = {k: pair for k, pair in changed.items() if pair[0] != pair[1]}
    assert changed == {
        "model": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/sd-turbo"),
        "steps": (50, 1),
        "guidance": (7.5, 0.0),
    }
    assert {k: v for k, v in fast.items() if k not in ("dnd", "preset")} == {
        k: v for k, v in paper.items() if k not in ("dnd", "preset")
    }
    assert {k: v for k, v in fast["dnd"].items() if k != "synthesizer"} == {
        k: v for k, v in paper["dnd"].items() if k != "synthesizer"
    }
    # its results go to their own folder, beside the paper settings' results
    assert run_name(paper) == "resnet50-imagenet" and run_name(fast) == "resnet50-imagenet-fast"


def test_no_config_says_to_pass_one() -> None:
    with pytest.raises(ConfigError, match=r"no config given: pass one with --configfile"):
        validate_config({})


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = cfg
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = cfg
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]

    return mutate


INVALID = [
    (
        _set("llm.backend", "gpt"),
        "config key 'llm.backend': 'gpt' is not allowed; allowed values: local, openai, none",
    ),
    (
        _set("dnd.scoring.method", "mean"),
        "config key 'dnd.scoring.method': 'mean' is not allowed; allowed values: combined, rank, "
        "similarity",
    ),
    (
        _set("dnd.synthesizer.images_per_concept", 0),
        "config key 'dnd.synthesizer.images_per_concept': 0 is less than the minimum of 1",
    ),
    (
        _set("dnd.prompt_mode", "paper"),
        "config key 'dnd.prompt_mode': 'paper' is not allowed; allowed values: batched, reference",
    ),
    # keys that moved into the `dnd:` section say where they live now
    (
        _set("llm.candidates", 3),
        "config key 'llm.candidates' has moved: it is now 'dnd.candidates' (settings that only "
        "the `dnd` method uses live in its own section); move it there",
    ),
    (
        _set("synthesizer", {"steps": 4}),
        "config key 'synthesizer' has moved: it is now 'dnd.synthesizer' (settings that only "
        "the `dnd` method uses live in its own section); move it there",
    ),
    (
        _set("methods", ["dnd", "clip"]),
        "config key 'methods[1]': 'clip' is not allowed; allowed values: topk, dnd, "
        "clipdissect, tellme, texplain",
    ),
    (
        _set("probe.datasets.0", {"name": "photos", "type": "folder", "path": "."}),
        "config key 'captioner.backend': `annotations` needs probe datasets that ship captions, "
        "and ['photos'] do not (only demo datasets do); use `blip`",
    ),
    (
        _set("captioner", {"backend": "blip", "model": "./no/such/blip"}),
        "config key 'captioner.model': folder './no/such/blip' does not exist",
    ),
    (
        _set("chunksize", 3),
        "config: unknown key 'chunksize' (did you mean 'chunk_size'?); allowed keys: batch_size, "
        "captioner, chunk_size, clipdissect, crop_regions, crop_squash, crops, device, dnd, dtype, "
        "evaluation, llm, max_failed_fraction, methods, plan, preset, probe, report, resources, run, "
        "save_every, shard_size, targets, tellme, texplain, top_k",
    ),
    (
        _set("targets.0.poolng", "avg"),
        "config section 'targets[0]': unknown key 'poolng' (did you mean 'pooling'?); allowed keys: "
        "classes, layers, name, pooling, spec, tokens, train, transform, weights",
    ),
    (
        _set("targets.0.pooling", "mean"),
        "config key 'targets[0].pooling': 'mean' is not allowed; allowed values: avg, max",
    ),
    (
        _set("targets.0.layers.2", {"name": "fc", "pooling": "sum"}),
        "config key 'targets[0].layers[2].pooling': 'sum' is not allowed; allowed values: avg, max",
    ),
    (
        _set("targets.0.layers.2", {"name": "fc", "neuron": "all"}),
        "config section 'targets[0].layers[2]': unknown key 'neuron' (did you mean 'neurons'?); "
        "allowed keys: name, neurons, pooling, tokens",
    ),
    (
        _set("targets.0.spec", "keras:resnet"),
        "config key 'targets[0].spec': 'keras:resnet' is not valid; expected one of "
        "torchvision:NAME, timm:NAME, hf:HUB_ID_OR_LOCAL_PATH, python:MODULE_OR_FILE.py:FACTORY",
    ),
    (_drop("targets.0.spec"), "config section 'targets[0]': missing required key 'spec'"),
    (_set("chunk_size", 0), "config key 'chunk_size': 0 is less than the minimum of 1"),
    (_set("chunk_size", "big"), "config key 'chunk_size': expected integer, got 'big'"),
    (_set("crop_squash", 8), "config key 'crop_squash': 8 is less than the minimum of 16"),
    (
        _set("captioner", {"backend": "blip", "min_length": -1}),
        "config key 'captioner.min_length': -1 is less than the minimum of 0",
    ),
    (
        _set("targets.0.layers.2", {"name": "fc", "neurons": "0-x"}),
        "config key 'targets[0].layers[2].neurons': '0-x' is not valid; expected `all`, ranges such "
        'as "0-63,100,200-255", or {sample: N, seed: S} for a seeded random sample of N neurons',
    ),
    (
        _set("targets.0.layers.2", {"name": "fc", "neurons": {"samples": 3}}),
        "config section 'targets[0].layers[2].neurons': unknown key 'samples' (did you mean "
        "'sample'?); allowed keys: sample, seed",
    ),
    (
        _set("probe.datasets.0.type", "zip"),
        "config key 'probe.datasets[0].type': 'zip' is not allowed; allowed values: folder, "
        "filelist, demo",
    ),
    (
        _set("probe.datasets.0.type", "folder"),
        "config section 'probe.datasets[0]': missing required key 'path'",
    ),
    (
        _set("run", "my run"),
        "config key 'run': 'my run' is not valid; expected a run name made of letters, digits, "
        "'_', '.', '-' (results go to results/{run}/)",
    ),
    (_set("targets", []), "config key 'targets': [] has 0 item(s); expected at least 1"),
    (
        _set("targets.0.transform.mean", [0.5, 0.5]),
        "config key 'targets[0].transform.mean': [0.5, 0.5] has 2 item(s); expected exactly 3",
    ),
    (
        _set("device", "gpu"),
        "config key 'device': 'gpu' is not allowed; allowed values: auto, cpu, cuda",
    ),
    (
        _set("targets.0.transform.crop", 128),
        "config key 'targets[0].transform.crop': 128 is larger than transform.resize (64); the "
        "centre crop must fit in the resized image",
    ),
    (
        _set("resources.activations.gpu", 1),
        "config section 'resources.activations': unknown key 'gpu' (did you mean 'gpus'?); allowed "
        "keys: cpus, gpus, mem_mb, runtime",
    ),
    (
        _set("probe.datasets.0", {"name": "l", "type": "filelist", "path": "x.txt"}),
        "config key 'probe.datasets[0].path': 'x.txt' is not a .csv or .parquet file list",
    ),
    (
        lambda cfg: cfg["targets"][0].pop("train") and cfg["targets"][0].update(weights="/nope.pt"),
        "config key 'targets[0].weights': file '/nope.pt' does not exist",
    ),
    (
        _set("targets.0.weights", "w.pt"),
        "config key 'targets[0].train': only a python: target without weights can be trained by "
        "the workflow (the trained weights become its weights)",
    ),
    (
        _set("targets.0.layers", "conv2"),
        "config key 'targets[0].layers': expected array, got 'conv2'",
    ),
    (
        lambda cfg: cfg["targets"].append(copy.deepcopy(cfg["targets"][0])),
        "target name 'shapenet' appears twice; give each a distinct name",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), INVALID)
def test_invalid_config_names_key_and_fix(
    mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    cfg = demo()
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert str(err.value) == message


def test_planning_an_openai_run_needs_no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # the key is checked where a request is sent (llm.OpenAIBackend), not when planning
    monkeypatch.delenv("NEUROSCRIBE_UNSET_KEY_FOR_TEST", raising=False)
    cfg = demo(llm={"backend": "openai", "api_key_env": "NEUROSCRIBE_UNSET_KEY_FOR_TEST"})
    assert validate_config(cfg)["llm"]["api_key_env"] == "NEUROSCRIBE_UNSET_KEY_FOR_TEST"


def test_llm_model_defaults_per_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    local = validate_config(demo(llm={"backend": "local"}))
    assert derive(local).llm_model == "Qwen/Qwen2.5-3B-Instruct"
    assert local["llm"]["model"] is None  # derived, never written back into the config
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    cfg = validate_config(demo(llm={"backend": "openai"}))
    assert derive(cfg).llm_model == "gpt-4o-mini" and cfg["llm"]["api_key_env"] == "OPENAI_API_KEY"
    named = validate_config(demo(llm={"backend": "openai", "model": "my-model"}))
    assert derive(named).llm_model == "my-model"
    keyless = demo(llm={"backend": "openai", "api_key_env": None, "base_url": "http://h:8000/v1"})
    monkeypatch.delenv("OPENAI_API_KEY")
    assert validate_config(keyless)["llm"]["base_url"] == "http://h:8000/v1"


def test_llm_jobs_run_on_the_head_node_only_for_an_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert derive(validate_config(demo(llm={"backend": "openai"}))).llm_on_head
    assert not derive(validate_config(demo(llm={"backend": "local"}))).llm_on_head
    in_cluster = demo(
        llm={"backend": "openai", "base_url": "http://vllm:8000/v1", "run_on": "compute"}
    )
    assert not derive(validate_config(in_cluster)).llm_on_head
    with pytest.raises(ConfigError, match=r"'llm\.run_on': `head` would run the local chat model"):
        validate_config(demo(llm={"backend": "local", "run_on": "head"}))


def test_hf_target_rejects_a_weights_file() -> None:
    cfg = demo()
    cfg["targets"][0].pop("train")
    cfg["targets"][0].update(spec="hf:org/model", weights="w.pt")
    with pytest.raises(
        ConfigError, match=r"hf targets take their weights from the hub id or folder"
    ):
        validate_config(cfg)


def test_layer_overrides_and_defaults_resolve() -> None:
    cfg = demo()
    cfg["targets"][0]["pooling"] = "max"
    cfg["targets"][0]["layers"] = ["conv2", {"name": "conv3", "pooling": "avg", "neurons": "0-3"}]
    target = targets_from_config(validate_config(cfg))[0]
    conv2, conv3 = target.layers
    assert (conv2.pooling, conv2.neurons) == ("max", "all")
    assert (conv3.pooling, conv3.neurons) == ("avg", "0-3")


def test_neuron_selection() -> None:
    assert select_neurons("all", 4, "x") == [0, 1, 2, 3]
    assert select_neurons("5, 0-2,2-3", 8, "x") == [0, 1, 2, 3, 5]
    sample = select_neurons({"sample": 5, "seed": 3}, 100, "x")
    assert sample == select_neurons({"sample": 5, "seed": 3}, 100, "x")
    assert sample != select_neurons({"sample": 5, "seed": 4}, 100, "x")
    assert len(set(sample)) == 5 and sample == sorted(sample)
    with pytest.raises(
        ConfigError, match=r"neuron 64 is out of range; the layer has 64 neurons \(0-63\)"
    ):
        select_neurons("0-64", 64, "where")
    with pytest.raises(ConfigError, match=r"range '9-3' is reversed"):
        select_neurons("9-3", 64, "where")
    with pytest.raises(ConfigError, match=r"sample of 65 neurons asked, but the layer has 64"):
        select_neurons({"sample": 65}, 64, "where")


def test_wrong_layer_lists_valid_names_closest_first(tmp_path: Path) -> None:
    cfg = demo()
    cfg["targets"][0]["layers"] = ["conv2", "conv4"]
    target = targets_from_config(validate_config(cfg))[0]
    with pytest.raises(LayerError) as err:
        check_layers(target, inspect_target(target, tmp_path))
    message = str(err.value)
    assert message.startswith(
        "target 'shapenet' (python:neuroscribe.demo.cnn:tiny_cnn) has no layer 'conv4'. "
        "Valid layer names, closest first: conv1, conv2, conv3"
    )
    assert "fc" in message and "conv1.0" in message


def test_torchvision_layer_check_runs_on_meta_device_and_rejects_shared_modules(
    tmp_path: Path,
) -> None:
    cfg = demo()
    cfg["targets"][0].pop("train")
    cfg["targets"][0].update(spec="torchvision:resnet50", weights="IMAGENET1K_V2")
    cfg["targets"][0]["transform"] = {"resize": 256, "crop": 224}
    cfg["targets"][0]["layers"] = ["layer4", "fc", "layer1.0.relu"]
    target = targets_from_config(validate_config(cfg))[0]
    modules = inspect_target(target, tmp_path)
    assert modules["layer4"]["shape"] == [2048, 7, 7]
    assert modules["fc"]["shape"] == [1000]
    with pytest.raises(LayerError, match=r"layer 'layer1.0.relu' runs 3 times per forward pass"):
        check_layers(target, modules)
    # cached: a second inspection reads the file instead of building the model
    assert (tmp_path / "shapenet.json").exists()
    assert inspect_target(target, tmp_path) == modules


def test_unknown_torchvision_weights_list_the_valid_ones(tmp_path: Path) -> None:
    cfg = demo()
    cfg["targets"][0].pop("train")
    cfg["targets"][0].update(spec="torchvision:resnet50", weights="IMAGENET")
    cfg["targets"][0]["transform"] = {"resize": 256, "crop": 224}
    target = targets_from_config(validate_config(cfg))[0]
    with pytest.raises(
        ConfigError, match=r"no weights 'IMAGENET'; valid: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"
    ):
        inspect_target(target, tmp_path)


def test_build_layout_chunks_the_selected_neurons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = demo(chunk_size=10, shard_size=100)
    cfg["targets"][0]["layers"] = [{"name": "conv2", "neurons": "0-4,20-31"}, "fc"]
    layout = build_layout(cfg)
    # the demo's second target: the same CNN with a planted shortcut, its fc described
    assert layout.layer_sizes == {"shapenet": {"conv2": 32, "fc": 7}, "shortcut": {"fc": 7}}
    chunks = layout.chunks[("shapenet", "conv2")]
    assert [c.name for c in chunks] == ["0000", "0001"]
    assert chunks[0].neurons == (0, 1, 2, 3, 4, 20, 21, 22, 23, 24)
    assert chunks[1].neurons == (25, 26, 27, 28, 29, 30, 31)
    assert layout.n_candidates == 1000 and layout.n_shards == 10
    # a target the workflow trains gets the trained weights as its weights
    assert layout.targets["shapenet"].weights == "results/demo/models/shapenet.pt"
    assert (tmp_path / "results" / "demo" / "inspect" / "shapenet.json").exists()


def test_timm_target_layers_are_checked(tmp_path: Path) -> None:
    cfg = demo()
    cfg["targets"][0].pop("train")
    cfg["targets"][0].update(spec="timm:resnet18")
    cfg["targets"][0]["transform"] = {"resize": 64, "crop": 64}
    cfg["targets"][0]["layers"] = ["layer3", "fc"]
    target = targets_from_config(validate_config(cfg))[0]
    assert check_layers(target, inspect_target(target, tmp_path)) == {"layer3": 256, "fc": 1000}
    cfg["targets"][0]["spec"] = "timm:resnet_18"
    with pytest.raises(ConfigError, match=r"timm has no model 'resnet_18'; closest: .*resnet18"):
        inspect_target(targets_from_config(validate_config(cfg))[0], tmp_path)


def test_check_config_names_the_file_line_and_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from neuroscribe.cli import main

    monkeypatch.chdir(tmp_path)  # the model inspection is cached under results/
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: demo\ntargets:\n  - name: x\n   spec: python:m:f\n")
    assert main(["check-config", str(bad)]) == 1
    assert capsys.readouterr().err == (
        f"error: {bad}, line 4, column 4: not valid YAML: while parsing a block collection: "
        "expected <block end>, but found '<block mapping start>'\n"
    )
    # files are layered as --configfile layers them: the overlay's value wins
    site = tmp_path / "site.yaml"
    site.write_text("top_k: 0\n")
    assert main(["check-config", str(REPO / "config" / "demo.yaml"), str(site)]) == 1
    assert "config key 'top_k': 0 is less than the minimum of 1" in capsys.readouterr().err
    assert main(["check-config", str(REPO / "config" / "demo.yaml")]) == 0
    assert capsys.readouterr().out.startswith("config OK: run 'demo' (results in results/demo/)")
    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 1
    assert "config file" in capsys.readouterr().err


def test_a_missing_calibration_file_fails_validation_naming_the_suite(tmp_path: Path) -> None:
    cfg = demo() | {"plan": {"calibration": str(tmp_path / "calibration.json")}}
    with pytest.raises(ConfigError, match=r"'plan\.calibration'.*gpu_suite\.py --out DIR"):
        validate_config(cfg)
    (tmp_path / "calibration.json").write_text("{}")
    assert validate_config(cfg)["plan"]["calibration"] == str(tmp_path / "calibration.json")
