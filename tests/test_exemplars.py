"""Exemplars of a chunk with `crop_squash`: the reference code's N x N views of top images and
crops, checked against the target run directly on those views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms

from factories import mixed_probe
from neuroscribe.activations import extract_shard
from neuroscribe.backends.captioners import exemplar_view
from neuroscribe.config import LayerSpec, TargetSpec, Transform
from neuroscribe.exemplars import chunk_exemplars
from neuroscribe.merge import merge_layer
from neuroscribe.models import build_target

CONV3 = LayerSpec("conv3", "all", "max", "cls")
TARGET = TargetSpec(
    name="t",
    spec="python:neuroscribe.demo.cnn:tiny_cnn",
    weights=None,
    transform=Transform(48, 40, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    layers=(CONV3,),
)
N_IMAGES = 6
NEURONS = [3, 17]


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 demo images and 3 of odd aspect ratios, their manifest, and the merged conv3 file
    (top-6: every image is a top image of every neuron)."""
    root = mixed_probe(tmp_path_factory.mktemp("probe"), 3, [(96, 32), (33, 57), (120, 40)])
    extract_shard(root / "manifest.parquet", TARGET, [CONV3], 0, 1, root / "s.h5", workers=0)
    merge_layer([root / "s.h5"], TARGET, CONV3, root / "conv3.h5", top_k=N_IMAGES)
    return root


def _direct(images: list[Image.Image], neurons: list[int]) -> np.ndarray:
    """conv3 max-pooled activation of each image's `neurons[i]`, one image at a time."""
    loaded = build_target(TARGET)
    tf = TARGET.transform
    prep = transforms.Compose(
        [
            transforms.Resize(tf.resize, antialias=True),
            transforms.CenterCrop(tf.crop),
            transforms.ToTensor(),
            transforms.Normalize(tf.mean, tf.std),
        ]
    )
    seen: list[torch.Tensor] = []
    module = dict(loaded.module.named_modules())["conv3"]
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out[0]))
    values = []
    with torch.no_grad():
        for image, neuron in zip(images, neurons, strict=True):
            loaded.call(prep(image)[None])
            values.append(float(seen[-1][neuron].amax()))
    handle.remove()
    return np.array(values)


def _exemplars(probe: Path, out: Path, crop_squash: int | None) -> pd.DataFrame:
    chunk_exemplars(
        probe / "conv3.h5",
        probe / "manifest.parquet",
        TARGET,
        "conv3",
        NEURONS,
        out,
        top_k=100,  # every image and every crop
        crop_squash=crop_squash,
        batch_size=4,
        workers=0,
        device="cpu",
        dtype="float32",
    )
    return pd.read_parquet(out)


def test_squashed_exemplars_are_scored_on_their_square_views(probe: Path, tmp_path: Path) -> None:
    manifest = pd.read_parquet(probe / "manifest.parquet").set_index("image_id")
    table = _exemplars(probe, tmp_path / "q.parquet", crop_squash=32)
    assert table["squash"].tolist() == [32] * len(table)
    whole = table[table["box"].isna()]
    crops = table[table["box"].notna()]
    assert len(whole) == N_IMAGES * len(NEURONS) and len(crops) > 0
    # boxes are in image pixels, inside the image
    for image_id, box in zip(crops["image_id"], crops["box"], strict=True):
        width, height = manifest.loc[image_id, ["width", "height"]]
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    # every activation is the target's on the exemplar's 32 x 32 view: the top images are
    # re-scored too, so images and crops are ranked on the same kind of pixels
    views = [
        exemplar_view(
            Image.open(manifest.loc[i, "path"]).convert("RGB"),
            None if b is None else tuple(int(v) for v in b),
            32,
        )
        for i, b in zip(table["image_id"], table["box"], strict=True)
    ]
    np.testing.assert_allclose(
        table["activation"], _direct(views, table["neuron"].tolist()), rtol=1e-4, atol=1e-5
    )
    assert (np.diff(table.groupby("neuron")["activation"].apply(list).iloc[0]) <= 0).all()

    # without crop_squash: no squash column, and the top images keep their merged activations
    plain = _exemplars(probe, tmp_path / "p.parquet", crop_squash=None)
    assert "squash" not in plain.columns
    before = plain[plain["box"].isna()].set_index(["neuron", "image_id"])["activation"]
    after = whole.set_index(["neuron", "image_id"])["activation"].loc[before.index]
    odd = [i for i in before.index if "odd" in manifest.loc[i[1], "path"]]
    assert not np.allclose(before.loc[odd], after.loc[odd], rtol=1e-3)  # re-scored
    originals = [Image.open(manifest.loc[i, "path"]).convert("RGB") for _, i in before.index]
    np.testing.assert_allclose(
        before,
        _direct(originals, [n for n, _ in before.index]),
        rtol=2e-3,  # the merged values are float16
        atol=1e-3,
    )
