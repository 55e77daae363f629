"""The blip captioner (a tiny random BLIP from a local folder) and the cached captioner."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tiny_blip import build_tiny_blip, build_tiny_blip2

from neuroscribe.backends.captioners import (
    BlipCaptioner,
    CachedCaptioner,
    CaptionRequest,
    crop_image,
    exemplar_requests,
    exemplar_view,
)
from neuroscribe.cache import DiskCache
from neuroscribe.demo.annotations import AnnotationCaptioner

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("tiny_blip"))


@pytest.fixture(scope="module")
def requests(tmp_path_factory: pytest.TempPathFactory) -> list[CaptionRequest]:
    """Ten random images of different sizes (PNG, so re-reading gives the same pixels)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = []
    for i in range(10):
        pixels = rng.integers(0, 256, (40 + 3 * i, 56 - 2 * i, 3), dtype=np.uint8)
        path = root / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        out.append(CaptionRequest(f"id{i}", str(path)))
    return out


@pytest.fixture(scope="module")
def captioner(blip_folder: Path) -> BlipCaptioner:
    return BlipCaptioner(
        str(blip_folder), device="cpu", batch_size=4, max_new_tokens=MAX_NEW_TOKENS
    )


class GenerateSpy:
    """Counts generate calls and their batch sizes, then runs the real generate."""

    def __init__(self, generate: Any) -> None:
        self.generate = generate
        self.batches: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.batches.append(int(kwargs["pixel_values"].shape[0]))
        return self.generate(*args, **kwargs)


class ProcessorSpy:
    """Records the sizes of the images handed to the processor; delegates everything else."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.sizes: list[tuple[int, int]] = []

    def __call__(self, images: Sequence[Image.Image], **kwargs: Any) -> Any:
        self.sizes.extend(im.size for im in images)
        return self.processor(images=images, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor, name)


def spy_generate(monkeypatch: pytest.MonkeyPatch, captioner: BlipCaptioner) -> GenerateSpy:
    spy = GenerateSpy(captioner.model.generate)
    monkeypatch.setattr(captioner.model, "generate", spy)
    return spy


def test_blip_gives_one_caption_per_request(captioner: BlipCaptioner, blip_folder: Path) -> None:
    assert captioner.caption([]) == []
    assert captioner.dtype == torch.float32  # auto dtype on CPU
    assert str(blip_folder) in captioner.id and f"max_new_tokens={MAX_NEW_TOKENS}" in captioner.id
    assert "num_beams=1" in captioner.id


def test_blip_captions_are_strings_that_depend_on_the_image(
    captioner: BlipCaptioner, requests: list[CaptionRequest]
) -> None:
    captions = captioner.caption(requests[:5])
    assert len(captions) == 5
    assert all(isinstance(c, str) and c and c == c.strip() for c in captions)
    assert "[DEC]" not in " ".join(captions)  # special tokens are skipped
    assert len(set(captions)) > 1  # a wide-init random model still tells images apart


def test_batches_span_all_requests_and_do_not_change_captions(
    captioner: BlipCaptioner, requests: list[CaptionRequest], monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = spy_generate(monkeypatch, captioner)
    batched = captioner.caption(requests)
    assert len(spy.batches) == math.ceil(len(requests) / 4)
    assert spy.batches == [4, 4, 2]
    monkeypatch.setattr(captioner, "batch_size", 1)
    one_by_one = captioner.caption(requests)
    assert len(spy.batches) == 3 + len(requests)
    assert one_by_one == batched  # greedy decoding is deterministic


def test_a_box_captions_the_cropped_pixels(
    captioner: BlipCaptioner,
    requests: list[CaptionRequest],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    whole = requests[3]
    box = (5, 7, 29, 26)
    spy = ProcessorSpy(captioner.processor)
    monkeypatch.setattr(captioner, "processor", spy)
    crop_caption, _ = captioner.caption([CaptionRequest(whole.image_id, whole.path, box), whole])
    width, height = Image.open(whole.path).size
    assert spy.sizes == [(box[2] - box[0], box[3] - box[1]), (width, height)]
    # the same pixels saved as their own image give the same caption
    cropped = tmp_path / "crop.png"
    Image.open(whole.path).convert("RGB").crop(box).save(cropped)
    assert captioner.caption([CaptionRequest("crop", str(cropped))]) == [crop_caption]


def test_crop_boxes_are_clipped_to_the_image_and_empty_ones_rejected() -> None:
    image = Image.new("RGB", (20, 10))
    assert crop_image(image, None) is image
    assert crop_image(image, (15, 5, 25, 12)).size == (5, 5)  # overshoot by rounding is clipped
    with pytest.raises(ValueError, match="empty"):
        crop_image(image, (30, 0, 40, 10))


def test_a_squashed_request_captions_its_pixels_resized_to_a_square(
    captioner: BlipCaptioner,
    requests: list[CaptionRequest],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    whole = requests[3]
    box = (5, 7, 29, 16)  # 24x9
    spy = ProcessorSpy(captioner.processor)
    monkeypatch.setattr(captioner, "processor", spy)
    squashed = [
        CaptionRequest(whole.image_id, whole.path, box, 20),
        CaptionRequest(whole.image_id, whole.path, None, 24),
    ]
    crop_caption, _ = captioner.caption(squashed)
    assert spy.sizes == [(20, 20), (24, 24)]
    view = tmp_path / "view.png"
    exemplar_view(Image.open(whole.path).convert("RGB"), box, 20).save(view)
    assert captioner.caption([CaptionRequest("view", str(view))]) == [crop_caption]


class Named:
    """A captioner that only has an id (for cache keys)."""

    id = "fake"


def test_squash_is_in_the_cache_key_only_when_set(tmp_path: Path) -> None:
    cached = CachedCaptioner(Named(), DiskCache(tmp_path / "c.sqlite", "captions"))  # type: ignore[arg-type]
    crop = CaptionRequest("i1", "/p", (0, 0, 10, 10))
    # the keys of requests without squash are those of earlier versions (caches stay valid)
    assert cached.key(crop) == "52863d37c799c48410cf01f26b0b18dcaba3df07f0b70c197234333bdc5c9d76"
    whole = CaptionRequest("i1", "/p")
    assert cached.key(whole) == "0c5f5c20a3efe6fbe7faba17ffaf259e917889ef20a8dc2db70c0e15658bc91f"
    squashed = [((0, 0, 10, 10), q) for q in (None, 375, 224)] + [(None, None), (None, 375)]
    keys = {cached.key(CaptionRequest("i1", "/p", box, q)) for box, q in squashed}
    assert len(keys) == 5


def test_exemplar_requests_read_the_squash_column_when_there_is_one(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame({"image_id": ["a", "b"], "path": ["/a.png", "/b.png"]}).to_parquet(manifest)
    table = pd.DataFrame({"image_id": ["a", "b"], "box": [None, [1, 2, 3, 4]]})
    assert [r.squash for r in exemplar_requests(table, manifest)] == [None, None]
    table["squash"] = pd.array([375, None], dtype="Int64")
    table.to_parquet(tmp_path / "e.parquet")
    back = exemplar_requests(pd.read_parquet(tmp_path / "e.parquet"), manifest)
    assert back == [
        CaptionRequest("a", "/a.png", None, 375),
        CaptionRequest("b", "/b.png", (1, 2, 3, 4), None),
    ]
    assert isinstance(back[0].squash, int)


class KwargsSpy:
    """Records the keyword arguments of each generate call, then runs the real generate."""

    def __init__(self, generate: Any) -> None:
        self.generate = generate
        self.kwargs: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.kwargs.append(kwargs)
        return self.generate(*args, **kwargs)


def test_min_length_reaches_generate_and_the_id_only_when_set(
    captioner: BlipCaptioner,
    blip_folder: Path,
    requests: list[CaptionRequest],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "min_length" not in captioner.id
    default = KwargsSpy(captioner.model.generate)
    monkeypatch.setattr(captioner.model, "generate", default)
    captioner.caption(requests[:1])
    assert "min_length" not in default.kwargs[0]

    longer = BlipCaptioner(
        str(blip_folder), device="cpu", max_new_tokens=MAX_NEW_TOKENS, min_length=5
    )
    assert longer.id == f"{captioner.id}:min_length=5"
    spy = KwargsSpy(longer.model.generate)
    monkeypatch.setattr(longer.model, "generate", spy)
    longer.caption(requests[:2])
    assert spy.kwargs[0]["min_length"] == 5


def test_min_length_comes_from_the_captioner_config(blip_folder: Path) -> None:
    from neuroscribe import backends

    cfg = {
        "backend": "blip",
        "model": str(blip_folder),
        "batch_size": 2,
        "max_new_tokens": MAX_NEW_TOKENS,
        "num_beams": 1,
    }
    assert backends.captioner(cfg, [], "cpu", "auto").min_length is None  # type: ignore[attr-defined]
    built = backends.captioner(cfg | {"min_length": 5}, [], "cpu", "auto")
    assert built.min_length == 5 and built.id.endswith(":min_length=5")  # type: ignore[attr-defined]


def test_blip_loads_with_the_blip_classes(captioner: BlipCaptioner) -> None:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    assert not captioner.blip2
    assert isinstance(captioner.model, BlipForConditionalGeneration)
    assert isinstance(captioner.processor, BlipProcessor)


def test_cached_blip_captions_each_exemplar_once(
    captioner: BlipCaptioner,
    requests: list[CaptionRequest],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    a, b = requests[0], requests[1]
    a_box = CaptionRequest(a.image_id, a.path, (0, 0, 16, 16))
    a_other_box = CaptionRequest(a.image_id, a.path, (8, 8, 24, 24))
    # several neurons share exemplars: the same (image, box) appears more than once
    calls = [a, b, a, a_box, b, a_box, a_other_box]
    expected = captioner.caption(calls)
    c = requests[2]
    c_caption = captioner.caption([c])[0]

    spy = spy_generate(monkeypatch, captioner)
    db = tmp_path / "cache.sqlite"
    cached = CachedCaptioner(captioner, DiskCache(db, "captions"))
    assert cached.id == captioner.id
    assert cached.caption(calls) == expected
    assert spy.batches == [4]  # the 4 distinct exemplars in one batch
    assert (cached.stats.requests, cached.stats.unique) == (7, 4)
    assert (cached.stats.cache_hits, cached.stats.captioned) == (0, 4)
    assert len(cached.cache) == 4  # a different box is a different key

    # a second call is answered from the cache alone
    assert cached.caption(calls) == expected
    assert spy.batches == [4]
    assert (cached.stats.cache_hits, cached.stats.captioned) == (4, 4)

    # and so is a new process on the same file, with a new request mixed in
    fresh = CachedCaptioner(captioner, DiskCache(db, "captions"))
    assert fresh.caption([c, *calls]) == [c_caption, *expected]
    assert spy.batches == [4, 1]  # only the miss
    assert (fresh.stats.cache_hits, fresh.stats.captioned) == (4, 1)


def test_generation_settings_are_part_of_the_key(
    captioner: BlipCaptioner, requests: list[CaptionRequest], tmp_path: Path
) -> None:
    cache = DiskCache(tmp_path / "cache.sqlite", "captions")
    CachedCaptioner(captioner, cache).caption(requests[:2])
    other = BlipCaptioner(captioner.model_name, device="cpu", max_new_tokens=3)
    cached_other = CachedCaptioner(other, cache)
    short = cached_other.caption(requests[:2])
    assert cached_other.stats.cache_hits == 0 and len(cache) == 4
    assert all(len(c.split()) <= 3 for c in short)


def test_blip2_folder_loads_the_blip2_classes_and_captions_without_the_prompt(
    requests: list[CaptionRequest], tmp_path: Path
) -> None:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    captioner = BlipCaptioner(str(build_tiny_blip2(tmp_path / "blip2")), device="cpu", batch_size=2)
    assert captioner.blip2
    assert isinstance(captioner.model, Blip2ForConditionalGeneration)
    assert isinstance(captioner.processor, Blip2Processor)
    captions = captioner.caption(requests[:3])
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    # the decoder-only language model echoes its prompt; it must not reach the caption
    assert all("<image>" not in c for c in captions)
    assert captioner.caption(requests[:3][::-1]) == captions[::-1]


@pytest.fixture
def annotations() -> AnnotationCaptioner:
    obj = {"shape": "circle", "colour": "red", "texture": "plain", "size": "large"}
    table = pd.DataFrame(
        [
            {
                "image_id": "i1",
                "caption": "a large red circle on a plain background",
                "objects": [{**obj, "box": [0, 0, 10, 10]}],
                "background": "plain",
            },
            {"image_id": "i2", "caption": "nothing here", "objects": [], "background": "plain"},
        ]
    )
    return AnnotationCaptioner(table)


class CountingCaptioner:
    """Wraps a captioner and records the requests each call sends it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[list[CaptionRequest]] = []

    @property
    def id(self) -> str:
        return self.inner.id

    def caption(self, requests: Sequence[CaptionRequest]) -> list[str]:
        self.calls.append(list(requests))
        return self.inner.caption(requests)


def test_cached_annotations_captioner(annotations: AnnotationCaptioner, tmp_path: Path) -> None:
    counting = CountingCaptioner(annotations)
    cached = CachedCaptioner(counting, DiskCache(tmp_path / "c.sqlite", "captions"))
    whole, crop = CaptionRequest("i1", "/p1"), CaptionRequest("i1", "/p1", (0, 0, 10, 10))
    corner = CaptionRequest("i1", "/p1", (50, 50, 60, 60))
    requests = [whole, crop, whole, corner, CaptionRequest("i2", "/p2")]
    captions = cached.caption(requests)
    assert captions == annotations.caption(requests)
    assert captions[1] == "a large red circle" and captions[3].endswith("plain background")
    assert [len(c) for c in counting.calls] == [4]
    assert cached.caption(requests[::-1]) == captions[::-1]
    assert len(counting.calls) == 1
    # the path is not part of the key: the image id already names the image
    assert cached.caption([CaptionRequest("i1", "/elsewhere/p1")]) == [captions[0]]
    assert len(counting.calls) == 1


class FailingCaptioner:
    """Captions the first `ok` requests it is sent, then fails (a job killed mid-way)."""

    id = "failing"

    def __init__(self, ok: int) -> None:
        self.ok = ok

    def caption(self, requests: Sequence[CaptionRequest]) -> list[str]:
        if self.ok < len(requests):
            raise RuntimeError("killed")
        self.ok -= len(requests)
        return [f"caption of {r.image_id}" for r in requests]


def test_each_chunk_is_stored_before_the_next(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c.sqlite", "captions")
    requests = [CaptionRequest(f"i{i}", "/p") for i in range(5)]
    with pytest.raises(RuntimeError, match="killed"):
        CachedCaptioner(FailingCaptioner(ok=2), cache, chunk_size=2).caption(requests)
    assert len(cache) == 2  # the first chunk survived
    resumed = CachedCaptioner(FailingCaptioner(ok=3), cache, chunk_size=2)
    assert resumed.caption(requests) == [f"caption of i{i}" for i in range(5)]
    assert (resumed.stats.cache_hits, resumed.stats.captioned) == (2, 3)


def test_a_captioner_returning_too_few_captions_is_an_error(tmp_path: Path) -> None:
    class Short:
        id = "short"

        def caption(self, requests: Sequence[CaptionRequest]) -> list[str]:
            return []

    cached = CachedCaptioner(Short(), DiskCache(tmp_path / "c.sqlite", "captions"))
    with pytest.raises(RuntimeError, match="returned 0 captions for 1 requests"):
        cached.caption([CaptionRequest("i", "/p")])


def test_caption_stage_captions_each_distinct_exemplar_once_across_chunks(
    blip_folder: Path,
    requests: list[CaptionRequest],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from neuroscribe.methods.dnd import stages as dnd

    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame(
        {"image_id": [r.image_id for r in requests], "path": [r.path for r in requests]}
    ).to_parquet(manifest)

    def exemplars(path: Path, layer_rows: list[tuple[int, int, str, list[int] | None]]) -> Path:
        rows = [
            {"model": "m", "layer": "conv", "neuron": n, "rank": k, "image_id": i, "box": b}
            for n, k, i, b in layer_rows
        ]
        pd.DataFrame(rows).to_parquet(path)
        return path

    # chunk A: neurons 0 and 1 share id0 whole and one crop of id1
    a = exemplars(
        tmp_path / "a.parquet",
        [
            (0, 0, "id0", None),
            (0, 1, "id1", [2, 2, 20, 20]),
            (1, 0, "id0", None),
            (1, 1, "id1", [2, 2, 20, 20]),
            (1, 2, "id2", None),
        ],
    )
    # chunk B: two exemplars seen in chunk A, one new
    b = exemplars(
        tmp_path / "b.parquet",
        [(2, 0, "id2", None), (2, 1, "id1", [2, 2, 20, 20]), (2, 2, "id3", None)],
    )
    sent: list[int] = []
    real = BlipCaptioner.generate
    monkeypatch.setattr(
        BlipCaptioner,
        "generate",
        lambda self, images: sent.append(len(images)) or real(self, images),
    )
    cfg = {
        "backend": "blip",
        "model": str(blip_folder),
        "batch_size": 8,
        "max_new_tokens": MAX_NEW_TOKENS,
        "num_beams": 1,
    }
    cache = tmp_path / "captions.sqlite"
    dnd.caption_chunk(a, manifest, tmp_path / "ca.parquet", cfg, [], cache, device="cpu")
    assert sent == [3]  # 5 exemplars, 3 distinct, one generate call
    dnd.caption_chunk(b, manifest, tmp_path / "cb.parquet", cfg, [], cache, device="cpu")
    assert sent == [3, 1]  # only id3 is new
    ca, cb = pd.read_parquet(tmp_path / "ca.parquet"), pd.read_parquet(tmp_path / "cb.parquet")
    assert ca["caption"].iloc[0] == ca["caption"].iloc[2]  # id0 for both neurons
    assert cb["caption"].iloc[0] == ca["caption"].iloc[4]  # id2 from the cache
    assert list(cb["box"].iloc[1]) == [2, 2, 20, 20]
    assert ca["captioner"].iloc[0].startswith(f"blip:{blip_folder}")
