"""Foundation-model roles built from their config sections (`captioner`, `llm`, `synthesizer`,
`similarity`), each typed by its role's interface.

The stages call these so a backend is chosen in one place; heavy libraries are imported only by
the backend that needs them, and the demo world (`neuroscribe.demo`) only when the config selects
one of its backends (`annotations`, `procedural`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from neuroscribe.backends.captioners import (
    BlipCaptioner,
    CachedCaptioner,
    Captioner,
    exemplar_requests,
)
from neuroscribe.backends.llm import ChatBackend, LLMClient, LocalBackend, OpenAIBackend
from neuroscribe.backends.synthesizers import DiffusersSynthesizer, Synthesizer
from neuroscribe.cache import DiskCache

if TYPE_CHECKING:  # the similarity backends import torch
    from neuroscribe.backends.similarity import ImageSimilarity


def captioner(
    cfg: dict[str, Any], worlds: Sequence[tuple[str, str | Path]], device: str, dtype: str
) -> Captioner:
    """The configured captioner; `worlds` are the (dataset, folder) pairs of annotated worlds."""
    if cfg["backend"] == "annotations":
        from neuroscribe.demo.annotations import AnnotationCaptioner

        return AnnotationCaptioner.from_world(worlds)
    return BlipCaptioner(
        cfg["model"],
        device=device,
        dtype=dtype,
        batch_size=cfg["batch_size"],
        max_new_tokens=cfg["max_new_tokens"],
        num_beams=cfg["num_beams"],
        # no schema default (absent when unset), so the captions' settings of runs without it
        # are unchanged
        min_length=cfg.get("min_length"),
    )


def caption_exemplars(
    exemplars: pd.DataFrame,
    manifest: str | Path,
    cfg: dict[str, Any],
    worlds: Sequence[tuple[str, str | Path]],
    cache: str | Path,
    device: str,
    dtype: str,
) -> tuple[list[str], CachedCaptioner]:
    """The caption of every row of an exemplars table (image or crop), through the run's
    caption cache: each distinct one captioned once, here or by any earlier job. Returns the
    captions in row order and the cached captioner (its `id` and `stats`)."""
    with DiskCache(cache, "captions") as store:
        cached = CachedCaptioner(captioner(cfg, worlds, device, dtype), store)
        return cached.caption(exemplar_requests(exemplars, manifest)), cached


def caption_images(
    image_ids: Sequence[str],
    manifest: str | Path,
    cfg: dict[str, Any],
    worlds: Sequence[tuple[str, str | Path]],
    cache: str | Path,
    device: str,
    dtype: str,
) -> tuple[list[str], CachedCaptioner]:
    """`caption_exemplars` of whole probe images: the caption of each of `image_ids`, in order,
    through the run's caption cache."""
    whole = pd.DataFrame({"image_id": list(image_ids), "box": None})
    return caption_exemplars(whole, manifest, cfg, worlds, cache, device, dtype)


def llm_client(cfg: dict[str, Any], cache: DiskCache | None, device: str, dtype: str) -> LLMClient:
    """The chat client of the configured llm backend (`openai` or `local`)."""
    if cfg["backend"] == "openai":
        backend: ChatBackend = OpenAIBackend(
            cfg["base_url"],
            cfg["model"],
            api_key_env=cfg["api_key_env"],
            timeout_s=cfg["timeout_s"],
        )
    elif cfg["backend"] == "local":
        backend = LocalBackend(cfg["model"], device=device, dtype=dtype)
    else:
        raise ValueError(f"llm backend {cfg['backend']!r} has no chat client")
    return LLMClient(
        backend, cache, max_concurrency=cfg["max_concurrency"], max_attempts=cfg["max_attempts"]
    )


def synthesizer(cfg: dict[str, Any], device: str, dtype: str) -> Synthesizer:
    """The configured synthesizer (`draw`, `check`, `id`)."""
    if cfg["backend"] == "procedural":
        from neuroscribe.demo.renderer import ProceduralSynthesizer

        return ProceduralSynthesizer(size=cfg["size"])
    return DiffusersSynthesizer(
        cfg["model"],
        steps=cfg["steps"],
        guidance=cfg["guidance"],
        size=cfg["size"],
        scheduler=cfg["scheduler"],
        device=device,
        dtype=dtype,
    )


def image_similarity(
    cfg: dict[str, Any], loaded: Any, transform: Any, settings: dict[str, Any]
) -> ImageSimilarity:
    """The configured image-image similarity (`embed`, `id`)."""
    from neuroscribe.backends.similarity import ClipSimilarity, TargetFeatureSimilarity

    if cfg["backend"] == "target-features":
        device = str(next(loaded.module.parameters()).device)
        return TargetFeatureSimilarity(loaded, transform, device=device, layer=cfg["layer"])
    return ClipSimilarity(cfg["model"], device=settings["device"], dtype=settings["dtype"])
