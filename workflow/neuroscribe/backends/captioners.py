"""Captioner role: text for an exemplar (a whole image or a crop box of it).

Backends share one interface, `caption(requests) -> captions`, and an `id` used in cache keys.
`blip` captions the pixels with BLIP or BLIP-2 (Describe-and-Dissect); `annotations` reads the
demo world's own annotations (`neuroscribe.demo.annotations`). `CachedCaptioner` puts any backend
behind the shared disk cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
from PIL import Image

from neuroscribe.cache import DiskCache, cache_key
from neuroscribe.hub import fetching
from neuroscribe.probe import load_rgb

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), image pixels


def as_box(value: Any) -> Box | None:
    """A crop box as a table stores it (list, array or None) as a tuple of ints, or None."""
    return None if value is None else tuple(int(v) for v in value)  # type: ignore[return-value]


@dataclass(frozen=True)
class CaptionRequest:
    image_id: str
    path: str
    box: tuple[int, int, int, int] | None = (
        None  # x0, y0, x1, y1 in image pixels; None = whole image
    )
    # the image or box resized to squash x squash pixels (`crop_squash`); None = as it is
    squash: int | None = None


def as_squash(value: Any) -> int | None:
    """An exemplar's `squash` as a table stores it (int, float, NaN, NA or None) as int or None."""
    return None if value is None or pd.isna(value) else int(value)


def exemplar_squash(exemplars: pd.DataFrame) -> list[int | None]:
    """Each row's `squash` (None throughout for a table without the column, as older ones)."""
    if "squash" not in exemplars.columns:
        return [None] * len(exemplars)
    return [as_squash(v) for v in exemplars["squash"]]


def exemplar_requests(exemplars: pd.DataFrame, manifest: str | Path) -> list[CaptionRequest]:
    """One request per row of an exemplars table (a whole image or a crop, squashed where the
    row says so), in row order, each with its file from the probe manifest."""
    paths = pd.read_parquet(manifest, columns=["image_id", "path"]).set_index("image_id")["path"]
    return [
        CaptionRequest(i, str(paths[i]), as_box(b), q)
        for i, b, q in zip(
            exemplars["image_id"], exemplars["box"], exemplar_squash(exemplars), strict=True
        )
    ]


class Captioner(Protocol):
    """What every captioner backend offers: an `id` for cache keys and batched `caption`."""

    @property
    def id(self) -> str: ...

    def caption(self, requests: Sequence[CaptionRequest]) -> list[str]: ...


# config model_type values that need the BLIP-2 classes (Q-Former + a language model)
BLIP2_MODEL_TYPES = frozenset({"blip-2", "blip_2"})


def crop_image(image: Image.Image, box: tuple[int, int, int, int] | None) -> Image.Image:
    """The exemplar's pixels: the whole image, or the box clipped to the image."""
    if box is None:
        return image
    width, height = image.size
    x0, y0, x1, y1 = (int(v) for v in box)
    # clip rather than let PIL pad with black: a box mapped back from the model input by rounding
    # can overshoot the image by a pixel
    x0, x1 = max(0, min(x0, width)), max(0, min(x1, width))
    y0, y1 = max(0, min(y0, height)), max(0, min(y1, height))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"crop box {box} is empty inside a {width}x{height} image")
    return image.crop((x0, y0, x1, y1))


def exemplar_view(
    image: Image.Image, box: tuple[int, int, int, int] | None, squash: int | None = None
) -> Image.Image:
    """The pixels of an exemplar as every stage sees them: the image or its box (`crop_image`),
    then, with `squash` (`crop_squash`), resized to squash x squash pixels whatever its aspect
    ratio (bicubic), as the reference code resizes its images and crops to 375 x 375."""
    view = crop_image(image, box)
    if squash is None:
        return view
    return view.resize((int(squash), int(squash)), Image.BICUBIC)


class BlipCaptioner:
    """The `blip` backend: BLIP (or BLIP-2) captions for each exemplar image or crop.

    `model` is a hub id or a local folder; a config with model_type "blip-2" loads the BLIP-2
    classes, anything else BLIP. Requests are batched across the whole call (`batch_size` images
    per `generate`), so many small per-neuron lists are best passed in one call.
    """

    def __init__(
        self,
        model: str | Path = "Salesforce/blip-image-captioning-large",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        min_length: int | None = None,
    ) -> None:
        # heavy imports stay here: the annotations backend must not need torch or transformers
        from transformers import (
            AutoConfig,
            Blip2ForConditionalGeneration,
            Blip2Processor,
            BlipForConditionalGeneration,
            BlipProcessor,
        )

        from neuroscribe.device import resolve_device, resolve_dtype

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model_name = str(model)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        # generate's min_length (the reference captions with min_length=5); None leaves it out
        self.min_length = min_length
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        with fetching(self.model_name, "captioner"):
            config = AutoConfig.from_pretrained(self.model_name)
            self.blip2 = config.model_type in BLIP2_MODEL_TYPES
            processor_cls = Blip2Processor if self.blip2 else BlipProcessor
            model_cls = (
                Blip2ForConditionalGeneration if self.blip2 else BlipForConditionalGeneration
            )
            self.processor = processor_cls.from_pretrained(self.model_name)
            self.model = model_cls.from_pretrained(self.model_name, dtype=self.dtype)
        self.model.to(self.device).eval()

    @property
    def id(self) -> str:
        # everything that changes the text of a caption, so a cache never mixes settings
        dtype = str(self.dtype).removeprefix("torch.")
        # min_length only when set, so the ids (and caches) of earlier runs stay valid
        min_length = "" if self.min_length is None else f":min_length={self.min_length}"
        return (
            f"blip:{self.model_name}:dtype={dtype}:max_new_tokens={self.max_new_tokens}"
            f":num_beams={self.num_beams}{min_length}"
        )

    def caption(self, requests: Sequence[CaptionRequest]) -> list[str]:
        captions: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            # several crops of one image in a batch read the file once
            images: dict[str, Image.Image] = {}
            for r in chunk:
                if r.path not in images:
                    images[r.path] = load_rgb(r.path)
            captions.extend(
                self.generate([exemplar_view(images[r.path], r.box, r.squash) for r in chunk])
            )
        return captions

    def generate(self, images: Sequence[Image.Image]) -> list[str]:
        """Captions for one batch of RGB images."""
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        extra = {} if self.min_length is None else {"min_length": self.min_length}
        with torch.inference_mode():
            out = self.model.generate(
                pixel_values=pixel_values,
                max_new_tokens=self.max_new_tokens,
                num_beams=self.num_beams,
                **extra,
            )
        if self.blip2 and not self.model.config.text_config.is_encoder_decoder:
            # a decoder-only language model returns its prompt (image tokens + bos) first
            out = out[:, self.model.config.num_query_tokens + 1 :]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [t.strip() for t in texts]


@dataclass
class CaptionStats:
    """Counts over the life of a CachedCaptioner (all calls together)."""

    requests: int = 0  # requests received
    unique: int = 0  # distinct (image, box) keys among them, per call
    cache_hits: int = 0  # distinct keys answered from the cache
    captioned: int = 0  # images actually sent to the wrapped captioner


class CachedCaptioner:
    """Any captioner behind a DiskCache: each (captioner id, image, box, squash) is captioned
    once, ever.

    Identical requests within a call (an exemplar shared by several neurons) are captioned once;
    the misses go to the wrapped captioner in calls of up to `chunk_size` (one call for most
    uses), and each call's captions are stored before the next, so a killed job keeps them.
    """

    def __init__(self, captioner: Captioner, cache: DiskCache, chunk_size: int = 256) -> None:
        self.captioner = captioner
        self.cache = cache
        self.chunk_size = chunk_size
        self.stats = CaptionStats()

    @property
    def id(self) -> str:
        return self.captioner.id

    def key(self, request: CaptionRequest) -> str:
        # the path is left out: image ids are already stable across machines, paths are not
        box = None if request.box is None else [int(v) for v in request.box]
        key: dict[str, Any] = {
            "captioner": self.captioner.id,
            "image_id": request.image_id,
            "box": box,
        }
        if request.squash is not None:  # only when set: keys of unsquashed exemplars as before
            key["squash"] = int(request.squash)
        return cache_key(key)

    def caption(self, requests: Sequence[CaptionRequest]) -> list[str]:
        keys = [self.key(r) for r in requests]
        unique: dict[str, CaptionRequest] = {}
        for k, r in zip(keys, requests, strict=True):
            unique.setdefault(k, r)
        found: dict[str, str] = {}
        misses: list[tuple[str, CaptionRequest]] = []
        for k, r in unique.items():
            cached = self.cache.get(k)
            if cached is None:
                misses.append((k, r))
            else:
                found[k] = str(cached)
        self.stats.requests += len(requests)
        self.stats.unique += len(unique)
        self.stats.cache_hits += len(found)
        for start in range(0, len(misses), self.chunk_size):
            chunk = misses[start : start + self.chunk_size]
            captions = self.captioner.caption([r for _, r in chunk])
            if len(captions) != len(chunk):
                raise RuntimeError(
                    f"captioner {self.captioner.id} returned {len(captions)} captions "
                    f"for {len(chunk)} requests"
                )
            for (k, _), text in zip(chunk, captions, strict=True):
                self.cache.put(k, text)
                found[k] = text
            self.stats.captioned += len(chunk)
        return [found[k] for k in keys]
