"""Probe manifest: listing the datasets, decoding every image, rejecting what cannot be used."""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import run_snakemake, tiny_config, workflow_env
from neuroscribe import probe
from neuroscribe.config import ConfigError, DatasetSpec
from neuroscribe.fanout import build_layout
from neuroscribe.plan import build_plan, format_plan
from neuroscribe.probe import (
    EmptyProbeError,
    build_manifest,
    check_image,
    demo_folder,
    image_id,
    load_rgb,
    shard_rows,
    survey_probe,
)

# -- helpers ----------------------------------------------------------------------------------


def save_rgb(path: Path, size: tuple[int, int] = (24, 16), seed: int = 0) -> Path:
    """A small random RGB image; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def folder(name: str, path: Path, labels: str = "none") -> DatasetSpec:
    return DatasetSpec(name=name, type="folder", path=str(path), labels=labels)


def filelist(name: str, path: Path, **kwargs: str) -> DatasetSpec:
    return DatasetSpec(name=name, type="filelist", path=str(path), **kwargs)


def run_probe(
    tmp_path: Path, datasets: list[DatasetSpec], workers: int = 1, out: str = "results"
) -> tuple[tuple[int, int], pd.DataFrame, pd.DataFrame]:
    results = tmp_path / out
    manifest = results / "probe" / "manifest.parquet"
    rejected = results / "probe" / "rejected.parquet"
    counts = build_manifest(datasets, results, manifest, rejected, workers=workers)
    return counts, pd.read_parquet(manifest), pd.read_parquet(rejected)


def na_none(value: object) -> object:
    """Missing labels read back as NaN (pandas string dtype); compare them as None."""
    return None if pd.isna(value) else value


def reasons(rejected: pd.DataFrame) -> dict[str, str]:
    """File name -> reason."""
    return {Path(p).name: r for p, r in zip(rejected["path"], rejected["reason"], strict=True)}


# -- corrupt and non-image files --------------------------------------------------------------


@pytest.mark.filterwarnings("error")  # includes files left open by a failed decode
def test_corrupt_jpegs_are_rejected_and_the_run_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "images"
    good_jpg = save_rgb(root / "a_good.jpg", size=(40, 30), seed=1)
    save_rgb(root / "z_good.png", size=(12, 20), seed=2)
    data = good_jpg.read_bytes()
    (root / "b_truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "c_garbage.jpg").write_bytes(np.random.default_rng(3).bytes(len(data)))
    # a real JPEG header followed by garbage instead of the entropy-coded data
    (root / "d_bad_body.jpg").write_bytes(data[:600] + np.random.default_rng(4).bytes(len(data)))

    (accepted, n_rejected), manifest, rejected = run_probe(tmp_path, [folder("photos", root)])

    assert (accepted, n_rejected) == (2, 3)
    assert sorted(Path(p).name for p in manifest["path"]) == ["a_good.jpg", "z_good.png"]
    sizes = {Path(p).name: (w, h) for p, w, h in manifest[["path", "width", "height"]].values}
    assert sizes == {"a_good.jpg": (40, 30), "z_good.png": (12, 20)}
    why = reasons(rejected)
    assert set(why) == {"b_truncated.jpg", "c_garbage.jpg", "d_bad_body.jpg"}
    assert "truncated" in why["b_truncated.jpg"]
    assert why["b_truncated.jpg"].startswith("OSError")
    assert "cannot identify image file" in why["c_garbage.jpg"]
    assert why["d_bad_body.jpg"].startswith(("OSError", "UnidentifiedImageError", "SyntaxError"))
    assert set(rejected["dataset"]) == {"photos"}
    assert all(Path(p).is_absolute() for p in manifest["path"])


def test_text_file_named_png_is_rejected_as_unidentifiable(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save_rgb(root / "real.png")
    (root / "notes.png").write_text("this is not an image\n")

    (accepted, n_rejected), manifest, rejected = run_probe(tmp_path, [folder("mixed", root)])

    assert (accepted, n_rejected) == (1, 1)
    assert [Path(p).name for p in manifest["path"]] == ["real.png"]
    (reason,) = rejected["reason"]
    assert "UnidentifiedImageError" in reason
    assert "cannot identify image file" in reason
    assert "notes.png" in reason
    assert rejected["path"].iloc[0] == str(root / "notes.png")


def test_many_rejects_are_logged_briefly_and_listed_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "images"
    save_rgb(root / "real.png")
    for i in range(25):
        (root / f"stray-{i:02d}.png").write_text("not an image\n")

    with caplog.at_level("WARNING", logger="neuroscribe.probe"):
        (_, n_rejected), _, rejected = run_probe(tmp_path, [folder("mixed", root)])

    assert n_rejected == len(rejected) == 25
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == probe.LOGGED_REJECTS + 1
    assert lines[-1].startswith("... and 15 more rejected files, all listed in ")


def test_missing_file_in_a_file_list_is_rejected(tmp_path: Path) -> None:
    save_rgb(tmp_path / "lists" / "here.png")
    listing = tmp_path / "lists" / "list.csv"
    pd.DataFrame({"path": ["here.png", "gone.png"]}).to_csv(listing, index=False)

    (accepted, n_rejected), _, rejected = run_probe(tmp_path, [filelist("l", listing)])

    assert (accepted, n_rejected) == (1, 1)
    assert reasons(rejected) == {"gone.png": "file not found"}


# -- empty probe sets -------------------------------------------------------------------------


def test_empty_folder_raises_and_writes_no_manifest(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    results = tmp_path / "results"
    manifest = results / "probe" / "manifest.parquet"
    rejected = results / "probe" / "rejected.parquet"

    with pytest.raises(EmptyProbeError, match=r"probe set is empty") as info:
        build_manifest([folder("my_empty_set", root)], results, manifest, rejected)

    assert "my_empty_set" in str(info.value)
    assert str(root) in str(info.value)
    assert "0 files found" in str(info.value)
    assert not manifest.exists()
    assert not rejected.exists()


def test_folder_of_only_bad_files_raises_naming_the_dataset(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.png").write_text("text")
    (root / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 10)
    results = tmp_path / "results"
    manifest = results / "probe" / "manifest.parquet"

    with pytest.raises(EmptyProbeError) as info:
        build_manifest([folder("all_broken", root)], results, manifest, results / "rej.parquet")

    message = str(info.value)
    assert "all_broken" in message
    assert "2 files found, 2 rejected" in message
    assert not manifest.exists()
    assert not (results / "rej.parquet").exists()


# -- labels and image ids ---------------------------------------------------------------------


def make_nested(root: Path) -> None:
    save_rgb(root / "cats" / "a.png", seed=1)
    save_rgb(root / "cats" / "deeper" / "more" / "b.jpg", seed=2)
    save_rgb(root / "dogs" / "c.png", size=(9, 7), seed=3)
    save_rgb(root / "top.png", seed=4)
    # hidden files and folders are not part of the dataset at all
    save_rgb(root / ".hidden.png", seed=5)
    save_rgb(root / ".cache" / "x.png", seed=6)


def test_subfolder_labels_and_relpath_ids(tmp_path: Path) -> None:
    root = tmp_path / "first" / "animals"
    make_nested(root)

    (accepted, n_rejected), manifest, rejected = run_probe(
        tmp_path, [folder("zoo", root, labels="subfolder")]
    )

    assert (accepted, n_rejected) == (4, 0)
    assert rejected.empty
    by_rel = {
        Path(p).relative_to(root.resolve()).as_posix(): row
        for p, row in zip(manifest["path"], manifest.itertuples(), strict=True)
    }
    assert sorted(by_rel) == ["cats/a.png", "cats/deeper/more/b.jpg", "dogs/c.png", "top.png"]
    assert by_rel["cats/a.png"].label == "cats"
    assert by_rel["cats/deeper/more/b.jpg"].label == "cats"  # the top-level subfolder
    assert by_rel["dogs/c.png"].label == "dogs"
    assert na_none(by_rel["top.png"].label) is None  # no subfolder, no label
    assert (by_rel["dogs/c.png"].width, by_rel["dogs/c.png"].height) == (9, 7)
    for rel, row in by_rel.items():
        assert row.image_id == image_id("zoo", rel)
        assert len(row.image_id) == 16
        int(row.image_id, 16)  # hex
    assert manifest["image_id"].is_unique
    assert set(manifest["dataset"]) == {"zoo"}

    # the same folder somewhere else: same ids, new paths
    moved = tmp_path / "elsewhere" / "deep" / "animals_copy"
    moved.parent.mkdir(parents=True)
    shutil.move(root, moved)
    _, manifest2, _ = run_probe(tmp_path, [folder("zoo", moved, labels="subfolder")], out="r2")
    ids = dict(zip(manifest["image_id"], map(na_none, manifest["label"]), strict=True))
    ids2 = dict(zip(manifest2["image_id"], map(na_none, manifest2["label"]), strict=True))
    assert ids == ids2
    assert all(p.startswith(str(moved.resolve())) for p in manifest2["path"])


def test_labels_none_and_ids_depend_on_dataset_name(tmp_path: Path) -> None:
    root = tmp_path / "animals"
    make_nested(root)
    _, manifest, _ = run_probe(tmp_path, [folder("zoo", root)])
    assert manifest["label"].isna().all()
    assert image_id("zoo", "cats/a.png") != image_id("farm", "cats/a.png")
    assert image_id("zoo", "cats/a.png") != image_id("zoo", "cats/b.png")
    assert image_id("zoo", "cats/a.png") == image_id("zoo", "cats/a.png")
    # the id hashes "dataset/relpath": pinned so a change of scheme is noticed
    assert image_id("zoo", "cats/a.png") == hashlib.sha1(b"zoo/cats/a.png").hexdigest()[:16]


def test_demo_dataset_reads_the_rendered_folder_with_subfolder_labels(tmp_path: Path) -> None:
    ds = DatasetSpec(name="shapes", type="demo", n_images=3)
    where = demo_folder(tmp_path / "results", ds)
    assert where == tmp_path / "results" / "probe" / "demo" / "shapes"
    save_rgb(where / "images" / "circle" / "0.png", seed=1)
    save_rgb(where / "images" / "square" / "1.png", seed=2)
    save_rgb(where / "images" / "square" / "2.png", seed=3)
    # the annotations beside the images are not probe files
    (where / "annotations.parquet").write_bytes(b"PAR1")

    (accepted, _), manifest, _ = run_probe(tmp_path, [ds])

    assert accepted == 3
    assert sorted(manifest["label"]) == ["circle", "square", "square"]
    assert set(manifest["image_id"]) == {
        image_id("shapes", r) for r in ("circle/0.png", "square/1.png", "square/2.png")
    }


# -- duplicates -------------------------------------------------------------------------------


def test_file_list_naming_an_image_twice_rejects_the_second(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    save_rgb(lists / "img" / "a.png", seed=1)
    save_rgb(lists / "img" / "b.png", seed=2)
    listing = lists / "list.csv"
    pd.DataFrame({"path": ["img/a.png", "img/b.png", "img/a.png", "./img/../img/b.png"]}).to_csv(
        listing, index=False
    )

    (accepted, n_rejected), manifest, rejected = run_probe(tmp_path, [filelist("lst", listing)])

    assert (accepted, n_rejected) == (2, 2)
    assert sorted(Path(p).name for p in manifest["path"]) == ["a.png", "b.png"]
    assert list(rejected["reason"]) == ["duplicate of lst/img/a.png", "duplicate of lst/img/b.png"]
    assert list(rejected["path"]) == [str(lists / "img/a.png"), str(lists / "./img/../img/b.png")]
    assert manifest["image_id"].is_unique


def test_two_datasets_covering_the_same_file_reject_the_second(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save_rgb(root / "sub" / "shared.png", seed=1)
    save_rgb(root / "only_first.png", seed=2)
    (root / "link.png").symlink_to(root / "only_first.png")  # same file under another name

    (accepted, n_rejected), manifest, rejected = run_probe(
        tmp_path, [folder("outer", root), folder("inner", root / "sub")]
    )

    assert (accepted, n_rejected) == (2, 2)
    assert sorted(zip(manifest["dataset"], manifest["path"], strict=True)) == [
        ("outer", str((root / "only_first.png").resolve())),
        ("outer", str((root / "sub" / "shared.png").resolve())),
    ]
    got = sorted(zip(rejected["dataset"], rejected["path"], rejected["reason"], strict=True))
    assert got == [
        ("inner", str(root / "sub" / "shared.png"), "duplicate of outer/sub/shared.png"),
        ("outer", str(root / "only_first.png"), "duplicate of outer/link.png"),
    ]


def test_byte_identical_files_keep_the_first_in_candidate_order(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    original = save_rgb(first / "b.png", seed=1)
    save_rgb(first / "c.png", seed=2)
    (first / "sub").mkdir()
    second.mkdir()
    shutil.copy(original, first / "a_copy.png")  # sorts before the original: it is kept
    shutil.copy(original, first / "sub" / "z_copy.png")
    shutil.copy(original, second / "again.png")
    (first / "same_text.png").write_text("not an image")
    (first / "same_text_too.png").write_text("not an image")  # rejected as unreadable, twice

    (accepted, n_rejected), manifest, rejected = run_probe(
        tmp_path, [folder("one", first), folder("two", second)]
    )

    assert (accepted, n_rejected) == (2, 5)
    assert sorted(Path(p).name for p in manifest["path"]) == ["a_copy.png", "c.png"]
    why = reasons(rejected)
    assert why["b.png"] == "same content as one/a_copy.png"
    assert why["z_copy.png"] == "same content as one/a_copy.png"
    assert why["again.png"] == "same content as one/a_copy.png"
    assert why["same_text.png"].startswith("UnidentifiedImageError")
    assert why["same_text_too.png"].startswith("UnidentifiedImageError")


def test_same_pixels_in_different_bytes_are_not_duplicates(tmp_path: Path) -> None:
    root = tmp_path / "images"
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    root.mkdir()
    Image.fromarray(pixels).save(root / "a.png", compress_level=1)
    Image.fromarray(pixels).save(root / "b.png", compress_level=9)
    assert (root / "a.png").read_bytes() != (root / "b.png").read_bytes()

    (accepted, n_rejected), _, _ = run_probe(tmp_path, [folder("px", root)])

    assert (accepted, n_rejected) == (2, 0)  # the hash is of the file, not of the pixels


# -- file names that are not UTF-8 ------------------------------------------------------------


def bad_name(folder_path: Path, name: bytes, data: bytes) -> str:
    """Write `data` under a file name made of raw bytes; return the name as Python sees it."""
    folder_path.mkdir(parents=True, exist_ok=True)
    raw = os.fsencode(folder_path) + b"/" + name
    with open(raw, "wb") as f:
        f.write(data)
    return os.fsdecode(raw)


def test_file_name_that_is_not_utf8_is_rejected_not_fatal(tmp_path: Path) -> None:
    root = tmp_path / "images"
    good = save_rgb(root / "good.png", seed=1)
    other = save_rgb(tmp_path / "elsewhere.png", seed=2).read_bytes()
    bad = bad_name(root, b"bad\xff.png", other)
    target = bad_name(
        tmp_path / "outside", b"caf\xe9.png", save_rgb(tmp_path / "x.png").read_bytes()
    )
    (root / "link.png").symlink_to(target)  # a good name for a file with a bad one

    (accepted, n_rejected), manifest, rejected = run_probe(tmp_path, [folder("names", root)])

    assert (accepted, n_rejected) == (1, 2)
    assert list(manifest["path"]) == [str(good.resolve())]
    rows = dict(zip(rejected["path"], rejected["reason"], strict=True))
    assert rows[f"{root}/bad\\xff.png"] == "file name is not valid UTF-8; rename it"
    assert rows[str(root / "link.png")] == (
        f"it links to {tmp_path.resolve()}/outside/caf\\xe9.png, whose name is not valid UTF-8; "
        "rename that file"
    )
    # ... and the count and fingerprint made when the workflow is parsed do not fail either
    survey = survey_probe([folder("names", root)])
    assert (survey.files, survey.image_files) == (3, 3)
    os.rename(bad, bad.replace("bad", "worse"))
    assert survey_probe([folder("names", root)]).fingerprint != survey.fingerprint


# -- thin decompression bombs -----------------------------------------------------------------


def test_thin_image_that_resizing_would_blow_up_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (50000, 1), (200, 10, 10)).save(root / "strip.png")
    Image.new("L", (1, 50000), 30).save(root / "pole.png")
    save_rgb(root / "photo.jpg", size=(400, 300))
    Image.new("RGB", (3000, 10)).save(root / "banner.png")  # 19200x64 at 64 px: 1.2 megapixels
    assert (root / "strip.png").stat().st_size < 1000  # a tiny file...
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = tmp_path / "results"
    args = (results / "manifest.parquet", results / "rejected.parquet")

    build_manifest([folder("thin", root)], results, *args, resize=256)

    # ...whose resize (12800000x256 RGB: 9.8 GB) was never attempted
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 500_000  # KiB
    why = reasons(pd.read_parquet(args[1]))
    assert set(why) == {"strip.png", "pole.png", "banner.png"}
    assert why["strip.png"].startswith(
        "aspect ratio 50000:1 (50000×1): resizing the shorter side to 256 px would make a "
        "12800000×256 image (3,277 megapixels, over the limit of 16); crop it"
    )
    assert "would make a 256×12800000 image" in why["pole.png"]
    assert "aspect ratio 300:1 (3000×10)" in why["banner.png"]  # 76800x256 at 256 px
    # the bound follows the largest resize of the targets: at 64 px the banner is fine
    build_manifest([folder("thin", root)], results, *args, resize=64)
    assert set(reasons(pd.read_parquet(args[1]))) == {"strip.png", "pole.png"}


def test_resized_size_bound_is_inclusive(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (2, 1)).save(tmp_path / "pair.png")
    assert probe.MAX_RESIZED_PIXELS == 4000 * 4000
    assert check_image(str(tmp_path / "dot.png"), resize=4000).reason is None  # exactly 16 Mpx
    (width, height, _, reason) = check_image(str(tmp_path / "pair.png"), resize=2829)
    assert (width, height) == (0, 0)
    assert reason is not None and "5658×2829 image" in reason  # 16.006 megapixels
    assert check_image(str(tmp_path / "pair.png"), resize=2828).reason is None


# -- image modes ------------------------------------------------------------------------------


def _gray(path: Path) -> None:
    Image.new("L", (10, 6), 77).save(path)


def _cmyk(path: Path) -> None:
    Image.new("CMYK", (11, 5), (0, 255, 255, 0)).save(path)  # red


def _rgba(path: Path) -> None:
    Image.new("RGBA", (7, 9), (10, 200, 30, 0)).save(path)


def _palette_transparent(path: Path) -> None:
    img = Image.new("P", (13, 4), 1)
    img.putpalette([0, 0, 0, 250, 20, 20, 0, 0, 255] + [0, 0, 0] * 253)
    img.putpixel((0, 0), 0)
    img.putpixel((2, 0), 2)
    # per-entry alpha (a tRNS chunk), read back as bytes: the case Pillow warns about
    img.save(path, transparency=bytes([0, 255, 128]))


def _sixteen_bit(path: Path) -> None:
    Image.fromarray(np.full((3, 8), 40000, dtype=np.uint16)).save(path)


MODES = {
    "gray.png": (_gray, "L", (10, 6)),
    "cmyk.jpg": (_cmyk, "CMYK", (11, 5)),
    "rgba.png": (_rgba, "RGBA", (7, 9)),
    "palette.png": (_palette_transparent, "P", (13, 4)),
    "sixteen.png": (_sixteen_bit, "I;16", (8, 3)),
}


@pytest.mark.parametrize("name", sorted(MODES))
def test_load_rgb_converts_every_mode(tmp_path: Path, name: str) -> None:
    make, mode, size = MODES[name]
    path = tmp_path / name
    make(path)
    with Image.open(path) as raw:
        assert raw.mode == mode  # the file really is in the mode under test

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's "palette images with transparency"
        img = load_rgb(str(path))

    assert img.mode == "RGB"
    assert img.size == size


def test_load_rgb_pixel_values(tmp_path: Path) -> None:
    for name, (make, _, _) in MODES.items():
        make(tmp_path / name)
    px = {name: load_rgb(str(tmp_path / name)).getpixel((1, 1)) for name in MODES}
    assert px["gray.png"] == (77, 77, 77)
    r, g, b = px["cmyk.jpg"]
    assert r > 200 and g < 60 and b < 60  # red stays red (no inverted CMYK)
    assert px["rgba.png"] == (10, 200, 30)
    assert px["palette.png"] == (250, 20, 20)
    assert px["sixteen.png"] == (155, 155, 155)  # 40000 / 65535 * 255


def test_every_mode_is_accepted_into_the_manifest(tmp_path: Path) -> None:
    root = tmp_path / "modes"
    root.mkdir()
    for name, (make, _, _) in MODES.items():
        make(root / name)

    (accepted, n_rejected), manifest, _ = run_probe(tmp_path, [folder("modes", root)])

    assert (accepted, n_rejected) == (len(MODES), 0)
    sizes = {Path(p).name: (w, h) for p, w, h in manifest[["path", "width", "height"]].values}
    assert sizes == {name: size for name, (_, _, size) in MODES.items()}


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 255, 256, 1000], [32768, 40000, 65534, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)

    out = np.asarray(load_rgb(str(path)))

    assert out.shape == (2, 4, 3)
    assert out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    gray = out[..., 0].astype(int)
    assert gray[0, 0] == 0
    assert gray[1, 3] == 255  # 65535
    assert gray[1, 2] in (254, 255)  # 65534
    assert abs(gray[1, 0] - 128) <= 1  # 32768 is mid-gray, not white
    assert abs(gray[1, 1] - 155) <= 1  # 40000
    assert gray[0, 1] <= 1 and gray[0, 3] <= 4  # small 16-bit values are dark
    assert len(np.unique(gray)) >= 5  # not clipped to 255 everywhere


def test_dark_sixteen_bit_image_stays_dark(tmp_path: Path) -> None:
    """A 16-bit image whose values all happen to be small is still on a 0..65535 scale."""
    path = tmp_path / "dark16.png"
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint16)).save(path)
    assert np.asarray(load_rgb(str(path))).max() <= 1


# -- file lists -------------------------------------------------------------------------------


def test_parquet_file_list_with_labels_relative_to_the_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lists = tmp_path / "data" / "lists"
    save_rgb(lists / "imgs" / "one.png", size=(5, 6), seed=1)
    save_rgb(lists / "imgs" / "two.jpg", size=(7, 8), seed=2)
    absolute = save_rgb(tmp_path / "far" / "three.png", size=(9, 10), seed=3)
    listing = lists / "probe.parquet"
    pd.DataFrame(
        {
            "file": ["imgs/one.png", "imgs/two.jpg", str(absolute)],
            "class": ["cat", None, "dog"],
            "extra": [1, 2, 3],
        }
    ).to_parquet(listing)
    monkeypatch.chdir(tmp_path / "far")  # relative paths are not relative to the cwd
    ds = filelist("plist", listing, path_column="file", label_column="class")

    (accepted, n_rejected), manifest, _ = run_probe(tmp_path, [ds])

    assert (accepted, n_rejected) == (3, 0)
    assert list(manifest.columns) == ["image_id", "path", "dataset", "label", "width", "height"]
    rows = {Path(p).name: r for p, r in zip(manifest["path"], manifest.itertuples(), strict=True)}
    assert rows["one.png"].label == "cat"
    assert na_none(rows["two.jpg"].label) is None
    stored = pq.read_table(tmp_path / "results" / "probe" / "manifest.parquet")
    assert stored.column("label").null_count == 1  # a real null, not the string "None"/"nan"
    assert rows["three.png"].label == "dog"
    assert rows["one.png"].path == str((lists / "imgs" / "one.png").resolve())
    assert rows["one.png"].image_id == image_id("plist", "imgs/one.png")
    assert rows["three.png"].image_id == image_id("plist", str(absolute))
    assert [(rows[n].width, rows[n].height) for n in ("one.png", "two.jpg", "three.png")] == [
        (5, 6),
        (7, 8),
        (9, 10),
    ]
    assert survey_probe([ds]).files == 3


def test_csv_file_list_with_default_columns(tmp_path: Path) -> None:
    save_rgb(tmp_path / "l" / "x.png", seed=1)
    save_rgb(tmp_path / "l" / "y.png", seed=2)
    listing = tmp_path / "l" / "list.csv"
    listing.write_text("path,label\nx.png,007\ny.png,\n")

    _, manifest, _ = run_probe(tmp_path, [filelist("csv", listing)])

    names = (Path(p).name for p in manifest["path"])
    labels = dict(zip(names, map(na_none, manifest["label"]), strict=True))
    assert labels == {"x.png": "007", "y.png": None}  # labels stay strings, leading zeros kept


def test_csv_file_list_without_the_path_column_is_a_config_error(tmp_path: Path) -> None:
    save_rgb(tmp_path / "x.png")
    listing = tmp_path / "list.csv"
    pd.DataFrame({"filename": ["x.png"], "label": ["a"]}).to_csv(listing, index=False)
    results = tmp_path / "results"

    with pytest.raises(ConfigError) as info:
        build_manifest(
            [filelist("badlist", listing)],
            results,
            results / "manifest.parquet",
            results / "rejected.parquet",
        )

    message = str(info.value)
    assert "no column 'path'" in message
    assert "badlist" in message
    assert "filename" in message  # lists the columns it has
    assert "path_column" in message  # says how to fix it
    assert not (results / "manifest.parquet").exists()


# -- the fingerprint that reruns the manifest -------------------------------------------------


def fingerprint(datasets: list[DatasetSpec]) -> str:
    return survey_probe(datasets).fingerprint


def later(path: Path) -> None:
    """Move a file's mtime on by a second, as a rewrite a moment later does."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_fingerprint_changes_when_a_file_is_replaced_or_renamed(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for i in range(4):
        save_rgb(root / f"{i}.bmp", seed=i)  # uncompressed: same size, same number of bytes
    datasets = [folder("f", root)]
    before = survey_probe(datasets)
    assert survey_probe(datasets) == before  # nothing changed, nothing to redo

    # replaced in place by another picture of the same byte size, and one renamed: same count
    replaced = root / "1.bmp"
    other = save_rgb(tmp_path / "other.bmp", seed=9).read_bytes()
    assert len(other) == replaced.stat().st_size and other != replaced.read_bytes()
    replaced.write_bytes(other)
    later(replaced)
    (root / "3.bmp").rename(root / "3b.bmp")

    after = survey_probe(datasets)
    assert (after.files, after.image_files) == (before.files, before.image_files) == (4, 4)
    assert after.fingerprint != before.fingerprint
    assert survey_probe(datasets) == after


@pytest.mark.parametrize("change", ["rewrite", "rename", "add", "remove", "bigger"])
def test_fingerprint_notices_each_kind_of_change(tmp_path: Path, change: str) -> None:
    root = tmp_path / "images"
    for i in range(3):
        save_rgb(root / "sub" / f"{i}.png", seed=i)
    datasets = [folder("f", root, labels="subfolder")]
    before = fingerprint(datasets)
    target = root / "sub" / "1.png"
    if change == "rewrite":  # same bytes count, later mtime
        target.write_bytes(target.read_bytes()[::-1])
        later(target)
    elif change == "rename":
        target.rename(root / "sub" / "1x.png")
    elif change == "add":
        save_rgb(root / "new.png")
    elif change == "remove":
        target.unlink()
    else:  # rewritten within the same clock tick: the size still tells
        st = target.stat()
        save_rgb(target, size=(30, 30))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint(datasets) != before


def test_fingerprint_of_a_file_list_covers_the_list_and_its_files(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    save_rgb(lists / "a.png", seed=1)
    save_rgb(lists / "b.png", seed=2)
    listing = lists / "list.csv"
    listing.write_text("path,label\na.png,x\nb.png,y\nmissing.png,z\n")
    datasets = [filelist("l", listing)]
    first = fingerprint(datasets)
    assert fingerprint(datasets) == first

    listing.write_text("path,label\na.png,x\nb.png,Y\nmissing.png,z\n")  # a label changed
    later(listing)
    second = fingerprint(datasets)
    assert second != first

    save_rgb(lists / "b.png", size=(50, 50))  # a listed file rewritten
    later(lists / "b.png")
    third = fingerprint(datasets)
    assert third != second

    save_rgb(lists / "missing.png")  # a missing file appears
    assert fingerprint(datasets) != third


def test_fingerprint_ignores_demo_folders_and_names_the_datasets(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save_rgb(root / "a.png")
    demo = DatasetSpec(name="world", type="demo", n_images=5)
    # a demo dataset is rendered by the workflow: its folder is the manifest rule's input
    assert survey_probe([demo]) == survey_probe([demo])
    assert survey_probe([demo]).files == 5
    assert fingerprint([folder("f", root), demo]) != fingerprint([folder("g", root), demo])


# -- the plan and the workflow ----------------------------------------------------------------


def test_plan_counts_image_files_apart_from_other_files(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    for i in range(3):
        save_rgb(root / f"{i}.png", seed=i)
    (root / "README.md").write_text("about these pictures")
    (root / "gallery.md").write_text("![a](0.png)")
    config = tiny_config(root)

    plan = build_plan(build_layout(config, tmp_path / "results"), config)

    assert plan["probe"]["files"] == 5
    assert plan["probe"]["image_files"] == 3
    assert "  probe: 5 files (3 with image extensions) in 1 dataset(s) (pics)" in format_plan(plan)


def test_snakemake_reruns_the_manifest_when_a_probe_file_changes(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    for i in range(10):
        save_rgb(root / f"{i}.png", seed=i)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root)))
    manifest = "results/probe/probe/manifest.parquet"
    env = workflow_env()

    run_snakemake(tmp_path, config, manifest, env=env)  # the one real job: a light one
    assert "Nothing to be done" in dry_run(tmp_path, config, manifest, env)

    save_rgb(root / "4.png", size=(30, 20), seed=99)  # replaced in place
    (root / "7.png").rename(root / "7b.png")  # renamed: the count stays 10

    rerun = dry_run(tmp_path, config, manifest, env)
    assert re.search(r"^probe_manifest\s+1$", rerun, re.M), rerun
    assert "Params have changed since last execution" in rerun  # the fingerprint did


def dry_run(workdir: Path, config: Path, target: str, env: dict[str, str]) -> str:
    proc = run_snakemake(workdir, config, "-n", target, env=env)
    return proc.stdout + proc.stderr


# -- counting, process pool, shards -----------------------------------------------------------


def test_survey_counts_every_dataset_type(tmp_path: Path) -> None:
    root = tmp_path / "animals"
    make_nested(root)  # 4 visible files, 2 hidden
    (root / "notes.png").write_text("counted: the probe has not checked it yet")
    (root / "README.md").write_text("a file, but not an image file")
    (root / "cats" / "UPPER.JPEG").write_bytes(b"extensions are compared in lower case")
    listing = tmp_path / "list.csv"
    pd.DataFrame({"path": ["a", "b.tif", "c.txt"]}).to_csv(listing, index=False)
    datasets = [
        folder("f", root, labels="subfolder"),
        filelist("l", listing),
        DatasetSpec(name="d", type="demo", n_images=17),
    ]
    survey = survey_probe(datasets)
    assert survey.files == 7 + 3 + 17
    assert survey.image_files == 6 + 1 + 17
    assert survey_probe([]).files == 0
    assert {".png", ".jpg", ".jpeg", ".tif", ".webp"} <= probe.image_extensions()
    assert ".pdf" not in probe.image_extensions()  # Pillow writes PDFs but cannot open them


def test_process_pool_gives_the_same_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "many"
    for i in range(70):
        save_rgb(root / f"class{i % 3}" / f"{i:03d}.png", size=(4 + i % 5, 3 + i % 7), seed=i)
    (root / "class0" / "broken.png").write_text("nope")
    data = (root / "class1" / "001.png").read_bytes()
    (root / "class2" / "cut.png").write_bytes(data[: len(data) // 2])
    (root / "class2" / "copy.png").write_bytes(data)  # hashed in the workers too
    datasets = [folder("many", root, labels="subfolder")]

    pools = []

    class SpyPool(probe.ProcessPoolExecutor):
        def __init__(self, *args: object, **kwargs: object) -> None:
            pools.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(probe, "ProcessPoolExecutor", SpyPool)

    serial = run_probe(tmp_path, datasets, workers=1, out="serial")
    assert pools == []
    parallel = run_probe(tmp_path, datasets, workers=2, out="parallel")
    assert pools == [(2,)]  # the pool path really ran

    assert serial[0] == parallel[0] == (70, 3)
    pd.testing.assert_frame_equal(serial[1], parallel[1])
    pd.testing.assert_frame_equal(serial[2], parallel[2])
    assert reasons(parallel[2])["copy.png"] == "same content as many/class1/001.png"
    assert sorted(reasons(parallel[2])) == ["broken.png", "copy.png", "cut.png"]


@pytest.mark.parametrize(
    ("n_images", "n_shards"), [(10, 3), (9, 3), (1, 1), (3, 5), (0, 2), (100, 7)]
)
def test_shard_rows_are_contiguous_and_cover_every_row_once(n_images: int, n_shards: int) -> None:
    shards = [shard_rows(n_images, s, n_shards) for s in range(n_shards)]
    assert np.array_equal(np.concatenate(shards), np.arange(n_images))
    for rows in shards:
        assert rows.dtype.kind == "i"
        if len(rows) > 1:
            assert (np.diff(rows) == 1).all()
    sizes = [len(rows) for rows in shards]
    assert max(sizes) - min(sizes) <= 1
    if n_shards > n_images:
        assert sizes.count(0) == n_shards - n_images


def test_shard_rows_examples() -> None:
    assert [shard_rows(10, s, 3).tolist() for s in range(3)] == [
        [0, 1, 2, 3],
        [4, 5, 6],
        [7, 8, 9],
    ]
    assert [shard_rows(2, s, 4).tolist() for s in range(4)] == [[0], [1], [], []]
