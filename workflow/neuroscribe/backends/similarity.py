"""Image-image similarity: compares a neuron's top exemplar images with a concept's images.

Describe-and-Dissect uses CLIP for this. `TargetFeatureSimilarity` is the offline, CLIP-free
stand-in with the same interface (`ImageSimilarity`: `id`, `embed`, `similarity`; it adds
`matrix`): it embeds images with the target model's own penultimate features.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn

from neuroscribe.activations import Normalizer, image_transform
from neuroscribe.config import Transform
from neuroscribe.layers import LayerError, closest_first
from neuroscribe.models import LoadedTarget, first_tensor


class ImageSimilarity(Protocol):
    """What every image-similarity backend offers: an `id` for cache keys and tables, and
    L2-normalised embeddings, so a cosine is a dot product."""

    @property
    def id(self) -> str: ...

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised embeddings [N, D] (float32), one row per image."""
        ...

    def similarity(self, a: list[Image.Image], b: list[Image.Image]) -> float:
        """Mean pairwise cosine similarity of the two sets."""
        ...


class _Captured(Exception):
    """Raised from the hook once the features are in: the rest of the forward pass is skipped."""


class TargetFeatureSimilarity:
    """Cosine similarity of the target's features.

    Features are the input of the model's last `nn.Linear` (in module order: the classifier
    head, so the penultimate representation), or, with `layer`, that module's output flattened
    to [N, C*H*W] (no pooling: spatial layout counts; for the demo CNN's "conv3" at 64 px that is
    64*8*8 = 4096 dims). The target's module is moved to `device` and left in its mode (eval).
    """

    def __init__(
        self,
        target: LoadedTarget,
        transform: Transform,
        device: str = "cpu",
        layer: str | None = None,
        batch_size: int = 64,
    ) -> None:
        self.target = target
        self.layer = layer
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._to_uint8 = image_transform(transform)
        self._normalize = Normalizer(transform, self.device)
        modules = dict(target.module.named_modules())
        if layer is None:
            linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
            if not linears:
                raise LayerError(
                    "the target has no torch.nn.Linear module to take penultimate features from; "
                    f"name a layer instead, one of: {', '.join(n for n in modules if n)}"
                )
            self._module = linears[-1]
        else:
            if not layer or layer not in modules:
                names = [n for n in modules if n]
                raise LayerError(
                    f"the model has no layer {layer!r}; valid: {', '.join(closest_first(layer, names))}"
                )
            self._module = modules[layer]
        target.module.to(self.device)

    @property
    def id(self) -> str:
        return f"target-features:{self.layer or 'penultimate'}"

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def from_input(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            captured.append(inputs[0])
            raise _Captured

        def from_output(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is None:
                raise LayerError(f"layer {self.layer!r} returned no tensor")
            captured.append(tensor)
            raise _Captured

        if self.layer is None:
            handle = self._module.register_forward_pre_hook(from_input)
        else:
            handle = self._module.register_forward_hook(from_output)
        try:
            with contextlib.suppress(_Captured):
                self.target.call(x)
        finally:
            handle.remove()
        if not captured:
            raise LayerError(f"feature module of {self.id} did not run in the forward pass")
        return captured[0].flatten(1).float()

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised features [N, D] (float32, on `device`), preprocessed like the pipeline."""
        if not images:
            raise ValueError("no images to embed")
        batches = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                x = torch.stack([self._to_uint8(image.convert("RGB")) for image in chunk])
                batches.append(self._run(self._normalize(x.to(self.device))))
        return nn.functional.normalize(torch.cat(batches), dim=1)

    def matrix(self, a: list[Image.Image], b: list[Image.Image]) -> torch.Tensor:
        """Cosine similarities [len(a), len(b)]."""
        ea = self.embed(a)
        return ea @ (ea if b is a else self.embed(b)).T

    def similarity(self, a: list[Image.Image], b: list[Image.Image]) -> float:
        """Mean pairwise cosine similarity of the two sets (1.0 only if all images embed alike)."""
        return float(self.matrix(a, b).mean())


class ClipSimilarity:
    """CLIP image embeddings (transformers `CLIPModel`, hub id or local folder), as in the paper.

    Only the vision tower and its projection run; images are preprocessed by the checkpoint's
    own image processor.
    """

    def __init__(
        self,
        model: str = "openai/clip-vit-base-patch16",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 64,
    ) -> None:
        from transformers import AutoImageProcessor, CLIPModel

        from neuroscribe.device import resolve_device, resolve_dtype
        from neuroscribe.hub import fetching

        self.model_name = model
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        with fetching(model, "similarity"):
            self.processor = AutoImageProcessor.from_pretrained(model)
            self.model = CLIPModel.from_pretrained(model, dtype=self.dtype)
        self.model = self.model.to(self.device).eval()
        self.tokenizer: Any = None

    @property
    def id(self) -> str:
        return f"clip:{self.model_name}:{str(self.dtype).removeprefix('torch.')}"

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] (float32, on `device`)."""
        if not images:
            raise ValueError("no images to embed")
        batches = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = [image.convert("RGB") for image in images[start : start + self.batch_size]]
                pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
                out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
                # transformers 5 returns a model output whose pooler_output is the projection
                features = out if isinstance(out, torch.Tensor) else out.pooler_output
                batches.append(features.float())
        return nn.functional.normalize(torch.cat(batches), dim=1)

    def similarity(self, a: list[Image.Image], b: list[Image.Image]) -> float:
        return float((self.embed(a) @ self.embed(b).T).mean())

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, D] (float32, on `device`), in one forward pass
        (the caller batches); the tokenizer loads on first use."""
        if not texts:
            raise ValueError("no texts to embed")
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            from neuroscribe.hub import fetching

            with fetching(self.model_name, "similarity"):
                self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.get_text_features(**tokens.to(self.device))
        features = out if isinstance(out, torch.Tensor) else out.pooler_output
        return nn.functional.normalize(features.float(), dim=1)
