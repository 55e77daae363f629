"""Foundation-model roles built from their config sections (`captioner`, `llm`).

The stages call these so a backend is chosen in one place; heavy libraries are imported only by
the backend that needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuroscribe.backends.captioners import AnnotationCaptioner, BlipCaptioner, Captioner
from neuroscribe.backends.llm import LLMClient, LocalBackend, OpenAIBackend
from neuroscribe.cache import DiskCache
from neuroscribe.methods.dnd.concepts import (
    BatchedProposer,
    ConceptSettings,
    FrequencyProposer,
    Proposer,
    ReferenceProposer,
)


def captioner(
    cfg: dict[str, Any], worlds: Sequence[tuple[str, str | Path]], device: str, dtype: str
) -> Captioner:
    """The configured captioner; `worlds` are the (dataset, folder) pairs of annotated worlds."""
    if cfg["backend"] == "annotations":
        return AnnotationCaptioner.from_world(worlds)
    return BlipCaptioner(
        cfg["model"],
        device=device,
        dtype=dtype,
        batch_size=cfg["batch_size"],
        max_new_tokens=cfg["max_new_tokens"],
        num_beams=cfg["num_beams"],
    )


def llm_client(cfg: dict[str, Any], cache: DiskCache | None, device: str, dtype: str) -> LLMClient:
    if cfg["backend"] == "openai":
        backend: Any = OpenAIBackend(
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


def proposer(cfg: dict[str, Any], cache: DiskCache | None, device: str, dtype: str) -> Proposer:
    """The concept proposer of the configured llm backend and prompt mode."""
    if cfg["backend"] == "none":
        return FrequencyProposer(n=cfg["candidates"])
    settings = ConceptSettings(
        model=cfg["model"],
        n=cfg["candidates"],
        temperature=cfg["temperature"],
        max_tokens=cfg["max_tokens"],
        seed=cfg["seed"],
        neurons_per_request=cfg["neurons_per_request"],
    )
    client = llm_client(cfg, cache, device, dtype)
    if cfg["prompt_mode"] == "reference":
        return ReferenceProposer(client, settings)
    return BatchedProposer(client, settings)


def synthesizer(cfg: dict[str, Any], device: str, dtype: str) -> Any:
    """The configured synthesizer (`draw`, `check`, `id`)."""
    from neuroscribe.backends.synthesizers import DiffusersSynthesizer, ProceduralSynthesizer

    if cfg["backend"] == "procedural":
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


def image_similarity(cfg: dict[str, Any], loaded: Any, transform: Any, settings: dict[str, Any]) -> Any:
    """The configured image-image similarity (`embed`, `id`)."""
    from neuroscribe.backends.similarity import ClipSimilarity, TargetFeatureSimilarity

    if cfg["backend"] == "target-features":
        device = str(next(loaded.module.parameters()).device)
        return TargetFeatureSimilarity(loaded, transform, device=device, layer=cfg["layer"])
    return ClipSimilarity(cfg["model"], device=settings["device"], dtype=settings["dtype"])
