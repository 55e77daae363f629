"""Sentences sampled through a trained translator, cached per image: an image's sentences do
not depend on which other images share its batch (per-row seeds), so every job of a run asks
for each image's sentences once, and a rerun (or a preempted job) finds them in the cache."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from neuroscribe.cache import DiskCache
from neuroscribe.device import resolve_device, resolve_dtype
from neuroscribe.methods.texplain.lm import load_lm
from neuroscribe.methods.texplain.sampling import generate_sentences
from neuroscribe.methods.texplain.translator import load_translator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How many sentences per image, and how they are drawn (config `texplain.sampling`)."""

    sentences: int = 64
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 30
    seed: int = 0
    batch_rows: int = 512

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sampling:
        return cls(**data)

    def key(self) -> dict[str, Any]:
        """What changes the sentences (not the batch size: seeds are per row)."""
        return {
            "sentences": self.sentences,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
        }


def seed_of(seed: int, *parts: str) -> int:
    """A 63-bit seed for one image (or one neuron's step) from the run's sampling seed."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Features:
    """The input layer's pooled features of every probe image (texplain_features' file) and,
    where the target has one, its output layer's scores."""

    image_ids: np.ndarray
    values: np.ndarray  # [images, units] float32
    scores: np.ndarray | None  # [images, classes]

    def rows(self, image_ids: Sequence[str]) -> np.ndarray:
        index = {str(i): n for n, i in enumerate(self.image_ids)}
        return np.array([index[str(i)] for i in image_ids], dtype=np.int64)


def read_features(path: str | Path, layer: str, output: str | None) -> Features:
    with h5py.File(path, "r", locking=False) as h5:
        ids = h5["image_ids"][:].astype(str)
        values = h5["layers"][layer][:].astype(np.float32)
        scores = h5["layers"][output][:].astype(np.float32) if output else None
    return Features(ids, values, scores)


class SentenceSource:
    """The LM, the translator and the sampling settings, with the run's sentence cache."""

    def __init__(
        self,
        lm: str,
        translator: str | Path,
        sampling: Sampling,
        cache: str | Path,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.lm_name, self.translator_path = lm, translator
        self._models: tuple[Any, Any, Any] | None = None  # loaded when something is sampled
        self.sampling = sampling
        self.cache = DiskCache(cache, "texplain_sentences")
        self._key = json.dumps(
            {"lm": lm, "translator": file_digest(translator), "sampling": sampling.key()},
            sort_keys=True,
        )
        self.generated = 0  # sentences sampled by this job (not found in the cache)

    def _loaded(self) -> tuple[Any, Any, Any]:
        """The LM, its tokenizer and the translator, loaded on first use: a job whose sentences
        are all cached never loads them."""
        if self._models is None:
            lm, tokenizer = load_lm(self.lm_name, self.device, self.dtype)
            self._models = lm, tokenizer, load_translator(self.translator_path, self.device)
        return self._models

    def _cache_key(self, name: str) -> str:
        return hashlib.sha256(f"{self._key}|{name}".encode()).hexdigest()

    def sentences(self, names: Sequence[str], features: np.ndarray) -> dict[str, list[str]]:
        """S sentences for each named feature vector (an image id, or a neuron's step), from
        the cache where they are, else sampled for all missing ones in batches."""
        found: dict[str, list[str]] = {}
        missing: list[int] = []
        for n, name in enumerate(names):
            hit = self.cache.get(self._cache_key(name))
            if hit is None:
                missing.append(n)
            else:
                found[name] = list(hit)
        if missing:
            found |= self._sample([names[n] for n in missing], features[missing])
        return {name: found[name] for name in names}

    def _sample(self, names: list[str], features: np.ndarray) -> dict[str, list[str]]:
        s = self.sampling
        lm, tokenizer, translator = self._loaded()
        out: dict[str, list[str]] = {}
        # bounded groups, each cached when done: a preempted job keeps what it sampled
        per_group = max(1, 4 * s.batch_rows // s.sentences)
        for start in range(0, len(names), per_group):
            group = names[start : start + per_group]
            x = torch.from_numpy(np.ascontiguousarray(features[start : start + per_group]))
            with torch.inference_mode():
                prefixes = translator(x.to(self.device, torch.float32))
                prefixes = prefixes.to(lm.get_input_embeddings().weight.dtype)
            drawn = generate_sentences(
                lm,
                tokenizer,
                prefixes,
                seeds=[seed_of(s.seed, name) for name in group],
                sentences=s.sentences,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                batch_rows=s.batch_rows,
            )
            for name, texts in zip(group, drawn, strict=True):
                self.cache.put(self._cache_key(name), texts)
                out[name] = texts
            self.generated += len(group) * s.sentences
            log.info("sampled %d sentences for %d inputs", len(group) * s.sentences, len(group))
        return out

    def close(self) -> None:
        self.cache.close()
