"""Pooled activations against a direct forward pass; top-K; sharded extraction equals one shard."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import REPO
from factories import mixed_probe
from neuroscribe.activations import extract_shard
from neuroscribe.config import LayerSpec, TargetSpec, Transform
from neuroscribe.merge import merge_layer
from neuroscribe.models import build_target

FACTORIES = REPO / "tests" / "factories.py"


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 demo images, with odd sizes mixed in, and their manifest."""
    root = mixed_probe(tmp_path_factory.mktemp("probe"), 27, [(80, 40), (33, 57), (64, 64)])
    return root


def _reference(
    target: TargetSpec, layers: list[LayerSpec], manifest: Path
) -> dict[str, np.ndarray]:
    """Independent of the pipeline: one image at a time, raw hook outputs pooled with numpy."""
    loaded = build_target(target)
    tf = target.transform
    prep = transforms.Compose(
        [
            transforms.Resize(tf.resize, antialias=True),
            transforms.CenterCrop(tf.crop),
            transforms.ToTensor(),
            transforms.Normalize(tf.mean, tf.std),
        ]
    )
    raw: dict[str, torch.Tensor] = {}
    modules = dict(loaded.module.named_modules())
    for layer in layers:
        modules[layer.name].register_forward_hook(
            lambda _m, _i, out, name=layer.name: raw.__setitem__(
                name, out[0] if isinstance(out, tuple) else out
            )
        )
    result: dict[str, list[np.ndarray]] = {layer.name: [] for layer in layers}
    for path in pd.read_parquet(manifest)["path"]:
        with torch.no_grad():
            loaded.call(prep(Image.open(path).convert("RGB"))[None])
        for layer in layers:
            out = raw[layer.name][0].numpy()
            if out.ndim == 3:
                out = out.mean((1, 2)) if layer.pooling == "avg" else out.max((1, 2))
            elif out.ndim == 2:
                out = out[0] if layer.tokens == "cls" else out.mean(0)
            result[layer.name].append(out)
    return {name: np.stack(values) for name, values in result.items()}


def _extract(
    target: TargetSpec, layers: list[LayerSpec], probe: Path, out: Path, n_shards: int = 1
) -> list[Path]:
    paths = []
    for shard in range(n_shards):
        path = out / f"shard-{shard}.h5"
        extract_shard(
            probe / "manifest.parquet",
            target,
            layers,
            shard,
            n_shards,
            path,
            batch_size=10,
            workers=0,
        )
        paths.append(path)
    return paths


def _layer_matrix(shards: list[Path], layer: str) -> np.ndarray:
    parts = []
    for path in shards:
        with h5py.File(path, "r") as h5:
            parts.append(h5["layers"][layer][:])
    return np.concatenate(parts).astype(np.float32)


def _target(spec: str, resize: int, crop: int, *layers: LayerSpec) -> TargetSpec:
    return TargetSpec(
        name="t",
        spec=spec,
        weights=None,
        transform=Transform(resize, crop, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        layers=layers,
    )


CNN_LAYERS = (
    LayerSpec("conv1", "all", "avg", "cls"),
    LayerSpec("conv3", "all", "max", "cls"),
    LayerSpec("fc", "all", "avg", "cls"),
)
VIT_LAYERS = (
    LayerSpec("encoder.layers.encoder_layer_0", "all", "avg", "cls"),
    LayerSpec("encoder.layers.encoder_layer_1", "all", "avg", "mean"),
    LayerSpec("heads.head", "all", "avg", "cls"),
)


@pytest.mark.parametrize(
    ("target", "widths"),
    [
        (_target("python:neuroscribe.demo.cnn:tiny_cnn", 48, 40, *CNN_LAYERS), [16, 64, 7]),
        (_target(f"python:{FACTORIES}:small_vit", 36, 32, *VIT_LAYERS), [32, 32, 5]),
    ],
    ids=["cnn", "vit"],
)
def test_pooled_activations_match_a_direct_forward_pass(
    target: TargetSpec, widths: list[int], probe: Path, tmp_path: Path
) -> None:
    shards = _extract(target, list(target.layers), probe, tmp_path)
    expected = _reference(target, list(target.layers), probe / "manifest.parquet")
    for layer, width in zip(target.layers, widths, strict=True):
        got = _layer_matrix(shards, layer.name)
        assert got.shape == (30, width)
        np.testing.assert_allclose(got, expected[layer.name], rtol=2e-3, atol=2e-3)
    with h5py.File(shards[0], "r") as h5:
        attrs = dict(h5["layers"][target.layers[1].name].attrs)
    assert attrs["spec"] == target.spec and attrs["layer"] == target.layers[1].name
    assert attrs["pooling"] == target.layers[1].pooling and '"crop": ' in attrs["transform"]


def test_hf_target_from_a_local_folder(probe: Path, tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=4,
    )
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    layers = (
        LayerSpec("vit.layers.1", "all", "avg", "cls"),
        LayerSpec("classifier", "all", "avg", "cls"),
    )
    target = _target(f"hf:{tmp_path / 'vit'}", 32, 32, *layers)
    shards = _extract(target, list(layers), probe, tmp_path)
    expected = _reference(target, list(layers), probe / "manifest.parquet")
    for layer in layers:
        np.testing.assert_allclose(
            _layer_matrix(shards, layer.name), expected[layer.name], rtol=2e-3, atol=2e-3
        )


def test_shards_merge_to_the_single_shard_result_with_correct_topk(
    probe: Path, tmp_path: Path
) -> None:
    target = _target("python:neuroscribe.demo.cnn:tiny_cnn", 48, 40, *CNN_LAYERS)
    one = _extract(target, list(CNN_LAYERS), probe, tmp_path / "one", n_shards=1)
    three = _extract(target, list(CNN_LAYERS), probe, tmp_path / "three", n_shards=3)
    manifest = pd.read_parquet(probe / "manifest.parquet")
    for layer in CNN_LAYERS:
        merge_layer(one, target, layer, tmp_path / f"one-{layer.name}.h5", top_k=5)
        merge_layer(three, target, layer, tmp_path / f"three-{layer.name}.h5", top_k=5)
        with (
            h5py.File(tmp_path / f"one-{layer.name}.h5") as a,
            h5py.File(tmp_path / f"three-{layer.name}.h5") as b,
        ):
            for key in ("activations", "rows", "image_ids", "topk_rows", "topk_ids", "topk_values"):
                np.testing.assert_array_equal(a[key][:], b[key][:], err_msg=f"{layer.name}/{key}")
            matrix = b["activations"][:].astype(np.float32)
            assert b["activations"].chunks[1] == 1  # one neuron per chunk: per-neuron reads
            assert b.attrs["top_k"] == 5 and b.attrs["n_images"] == 30
            for neuron in range(matrix.shape[1]):
                top = b["topk_rows"][neuron]
                expected = np.argsort(-matrix[:, neuron], kind="stable")[:5]
                np.testing.assert_array_equal(top, expected)
                np.testing.assert_array_equal(b["topk_values"][neuron], matrix[expected, neuron])
                assert list(b["topk_ids"][neuron].astype(str)) == list(
                    manifest["image_id"].iloc[expected]
                )


def test_topk_larger_than_the_probe_keeps_every_image(probe: Path, tmp_path: Path) -> None:
    target = _target("python:neuroscribe.demo.cnn:tiny_cnn", 48, 40, CNN_LAYERS[2])
    shards = _extract(target, [CNN_LAYERS[2]], probe, tmp_path, n_shards=4)
    merge_layer(shards, target, CNN_LAYERS[2], tmp_path / "fc.h5", top_k=100)
    with h5py.File(tmp_path / "fc.h5") as h5:
        assert h5["topk_rows"].shape == (7, 30)
        assert sorted(h5["topk_rows"][0]) == list(range(30))


def test_more_shards_than_images_leaves_empty_shards_that_merge_cleanly(
    tmp_path: Path, probe: Path
) -> None:
    target = _target("python:neuroscribe.demo.cnn:tiny_cnn", 48, 40, CNN_LAYERS[2])
    shards = _extract(target, [CNN_LAYERS[2]], probe, tmp_path, n_shards=31)
    merge_layer(shards, target, CNN_LAYERS[2], tmp_path / "fc.h5", top_k=3)
    with h5py.File(tmp_path / "fc.h5") as h5:
        assert h5["activations"].shape == (30, 7)


def test_a_layer_stores_only_the_neurons_it_describes(probe: Path, tmp_path: Path) -> None:
    """`neurons: "5-7,60"` stores 4 columns (and their indices), the same values as a full run;
    the exemplars of those neurons read them by index, and others are refused by name."""
    from neuroscribe.exemplars import chunk_exemplars

    every = LayerSpec("conv3", "all", "max", "cls")
    some = LayerSpec("conv3", "5-7,60", "max", "cls")
    full = _target("python:neuroscribe.demo.cnn:tiny_cnn", 48, 40, every)
    part = _target("python:neuroscribe.demo.cnn:tiny_cnn", 48, 40, some)
    merge_layer(
        _extract(full, [every], probe, tmp_path / "a", 2), full, every, tmp_path / "a.h5", 3
    )
    merge_layer(_extract(part, [some], probe, tmp_path / "b", 2), part, some, tmp_path / "b.h5", 3)
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert a["activations"].shape == (30, 64) and b["activations"].shape == (30, 4)
        assert list(b["neurons"][:]) == [5, 6, 7, 60]
        np.testing.assert_array_equal(b["activations"][:], a["activations"][:, [5, 6, 7, 60]])
        np.testing.assert_array_equal(b["topk_rows"][:], a["topk_rows"][:][[5, 6, 7, 60]])
    for name in ("a", "b"):
        chunk_exemplars(
            tmp_path / f"{name}.h5",
            probe / "manifest.parquet",
            part,
            "conv3",
            [6, 60],
            tmp_path / f"{name}.parquet",
            top_k=3,
            crops=False,
        )
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    )
    with pytest.raises(ValueError, match=r"neurons \[8\] are not stored"):
        chunk_exemplars(
            tmp_path / "b.h5",
            probe / "manifest.parquet",
            part,
            "conv3",
            [8],
            tmp_path / "c.parquet",
            top_k=3,
            crops=False,
        )
