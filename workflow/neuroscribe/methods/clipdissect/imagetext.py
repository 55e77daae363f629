"""The image-concept matrix sim [images, concepts] that soft-WPMI turns into probabilities.

Backends (`clipdissect.backend`):
- `clip`: cosine similarity of L2-normalised CLIP image and text embeddings (transformers
  `CLIPModel`, through backends.similarity.ClipSimilarity). Image embeddings of the probe images
  it may use are computed once per run and cached under results/{run}/cache/clipdissect/, keyed by the
  model and the manifest's content; text embeddings likewise, keyed by the model and the concepts.
- `annotations` (the demo world): 1 where every word of the concept is in the image's
  annotation (its caption), else 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from neuroscribe.io import atomic_path
from neuroscribe.words import words

log = logging.getLogger(__name__)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def annotation_matrix(
    annotations: pd.DataFrame, image_ids: Sequence[str], concepts: Sequence[str]
) -> torch.Tensor:
    """1.0 where the image's caption holds every word of the concept, else 0.0."""
    captions = dict(zip(annotations["image_id"], annotations["caption"], strict=True))
    missing = [i for i in image_ids if i not in captions]
    if missing:
        raise KeyError(
            f"{len(missing)} probe images have no annotation (e.g. {missing[0]}); the "
            "`annotations` backend needs a demo-world probe set"
        )
    concept_words = [set(words(c)) for c in concepts]
    sim = np.zeros((len(image_ids), len(concepts)), dtype=np.float32)
    for row, image in enumerate(image_ids):
        present = set(words(captions[image]))
        for col, needed in enumerate(concept_words):
            if needed and needed <= present:
                sim[row, col] = 1.0
    return torch.from_numpy(sim)


def _cached(path: Path, compute: Any) -> np.ndarray:
    if path.exists():
        log.info("cached embeddings: %s", path)
        return np.load(path)
    values = np.ascontiguousarray(compute(), dtype=np.float32)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, values)
    return values


def clip_matrix(
    backend: dict[str, Any],
    manifest: pd.DataFrame,
    manifest_digest: str,
    image_rows: np.ndarray,
    concepts: Sequence[str],
    cache: str | Path,
    device: str,
    dtype: str,
) -> tuple[torch.Tensor, str]:
    """Cosine similarity [images, concepts] of CLIP embeddings of the manifest rows
    `image_rows` and the concepts, with the model's id."""
    from neuroscribe.backends.similarity import ClipSimilarity
    from neuroscribe.probe import load_rgb

    clip = ClipSimilarity(backend["model"], device, dtype, backend["batch_size"])
    folder = Path(cache) / "clipdissect"

    def embed_images() -> np.ndarray:
        paths = manifest["path"].to_numpy()[image_rows].tolist()
        out = []
        step = backend["batch_size"]
        for start in range(0, len(paths), step):
            images = [load_rgb(p) for p in paths[start : start + step]]
            out.append(clip.embed(images).cpu().numpy())
            log.info("embedded %d of %d probe images", start + len(images), len(paths))
        return np.concatenate(out)

    def embed_texts() -> np.ndarray:
        out = []
        step = backend["text_batch_size"]
        for start in range(0, len(concepts), step):
            out.append(clip.embed_text(list(concepts[start : start + step])).cpu().numpy())
        return np.concatenate(out)

    # only the rows the method may see are embedded (a held-out image never is)
    rows_key = hashlib.sha256(np.asarray(image_rows, dtype=np.int64).tobytes()).hexdigest()
    images = _cached(
        folder / f"images-{_digest(clip.id, manifest_digest, rows_key)}.npy", embed_images
    )
    texts = _cached(folder / f"texts-{_digest(clip.id, list(concepts))}.npy", embed_texts)
    sim = torch.from_numpy(images) @ torch.from_numpy(texts).T
    return sim, clip.id
