"""Simulator role: how strongly should each image activate a neuron, given only its label?

Backends share one interface, `predict(labels, images) -> Simulation`, and an `id` recorded
with every score. `clip` scores an image by its image-text cosine with the label under any
CLIP-like model (SigLIP included); `annotations` is the demo world's exact simulator
(`neuroscribe.demo.annotations`). A label a simulator cannot use gets NaN predictions and the
reason, never a silent drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class ProbeImage:
    image_id: str
    path: str


@dataclass
class Simulation:
    """Predictions [labels, images] (NaN rows for labels that could not be simulated) and, per
    label, None or the reason it could not be."""

    predictions: np.ndarray
    reasons: list[str | None]


class Simulator(Protocol):
    @property
    def id(self) -> str: ...

    def predict(self, labels: Sequence[str], images: Sequence[ProbeImage]) -> Simulation: ...


def unusable(label: Any) -> str | None:
    """Why a label cannot be simulated by any backend (no label, an empty one), or None."""
    if not isinstance(label, str):
        return "no label"
    if not label.strip():
        return "empty label"
    return None


class ClipSimulator:
    """Image-text cosine of each image with each label, under a CLIP-like model (transformers
    `AutoModel` with `get_image_features` and `get_text_features`: CLIP, SigLIP). Images are
    embedded once per simulator, whatever the number of labels."""

    def __init__(
        self, model: str, device: str = "auto", dtype: str = "auto", batch_size: int = 64
    ) -> None:
        from transformers import AutoModel, AutoProcessor

        from neuroscribe.device import resolve_device, resolve_dtype
        from neuroscribe.hub import fetching

        self.model_name = model
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        with fetching(model, "simulator"):
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModel.from_pretrained(model, dtype=self.dtype)
        self.model = self.model.to(self.device).eval()
        self._images: dict[str, np.ndarray] = {}

    @property
    def id(self) -> str:
        return f"clip:{self.model_name}:{str(self.dtype).removeprefix('torch.')}"

    @staticmethod
    def _features(out: Any) -> Any:
        # transformers 5 may return a model output whose pooler_output is the projection
        return out if hasattr(out, "float") else out.pooler_output

    def _embed(self, kind: str, items: Sequence[Any]) -> np.ndarray:
        import torch

        parts = []
        with torch.inference_mode():
            for start in range(0, len(items), self.batch_size):
                chunk = list(items[start : start + self.batch_size])
                if kind == "image":
                    pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
                    out = self.model.get_image_features(
                        pixel_values=pixels.to(self.device, self.dtype)
                    )
                else:
                    # SigLIP was trained on max-length padding; CLIP accepts it too
                    tokens = self.processor(
                        text=chunk, return_tensors="pt", padding="max_length", truncation=True
                    )
                    out = self.model.get_text_features(
                        **{k: v.to(self.device) for k, v in tokens.items()}
                    )
                features = self._features(out).float()
                parts.append(torch.nn.functional.normalize(features, dim=1).cpu().numpy())
        return np.concatenate(parts)

    def text_cosine(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cosine of each pair (a[i], b[i]) in the model's text space."""
        return (self._embed("text", a) * self._embed("text", b)).sum(axis=1).tolist()

    def predict(self, labels: Sequence[str], images: Sequence[ProbeImage]) -> Simulation:
        from neuroscribe.probe import load_rgb

        new = [i for i in dict.fromkeys(images) if i.image_id not in self._images]
        if new:
            vectors = self._embed("image", [load_rgb(i.path) for i in new])
            self._images.update(zip((i.image_id for i in new), vectors, strict=True))
        reasons = [unusable(label) for label in labels]
        predictions = np.full((len(labels), len(images)), np.nan, dtype=np.float32)
        usable = [j for j, why in enumerate(reasons) if why is None]
        if usable and images:
            text = self._embed("text", [labels[j] for j in usable])
            image = np.stack([self._images[i.image_id] for i in images])
            predictions[usable] = text @ image.T
        return Simulation(predictions, reasons)


def simulator(cfg: dict[str, Any], worlds: Sequence[tuple[str, str]], device: str, dtype: str):
    """The configured simulator (`evaluation.simulator`)."""
    if cfg["backend"] == "annotations":
        from neuroscribe.demo.annotations import AnnotationSimulator

        return AnnotationSimulator(worlds)
    return ClipSimulator(cfg["model"], device=device, dtype=dtype)
