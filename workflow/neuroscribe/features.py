"""Features of images for scoring a neuron's candidate labels, shared by the methods.

A method that checks a label against a neuron (Describe-and-Dissect's scores, TeLLMe's and
TExplain's checks) needs the same few things: image-similarity embeddings of image files or of
exemplar crops (`embed_files`), a layer's pooled activations on image files (`layer_activations`),
and each of these computed once per job however many neurons share an image (`Memo`).
Heavy libraries (torch, the target's model) are imported by the functions that use them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from neuroscribe.backends.captioners import as_box, as_squash, exemplar_view
from neuroscribe.probe import load_rgb

if TYPE_CHECKING:
    import torch

    from neuroscribe.backends.similarity import ImageSimilarity
    from neuroscribe.config import LayerSpec, Transform
    from neuroscribe.models import LoadedTarget


def embed_files(
    sim: ImageSimilarity, items: Sequence[tuple[Any, ...]], batch: int = 256
) -> torch.Tensor:
    """Similarity embeddings [N, D] of (path, box or None) or (path, box or None, squash or
    None) items: the whole image file, or the box of it, resized to squash x squash where an
    item says so (`exemplar_view`); `batch` files are read and embedded at a time."""
    import torch

    parts = []
    for start in range(0, len(items), batch):
        images = [
            exemplar_view(load_rgb(item[0]), as_box(item[1]), _squash_of(item))
            for item in items[start : start + batch]
        ]
        parts.append(sim.embed(images))
    return torch.cat(parts)


def _squash_of(item: tuple[Any, ...]) -> int | None:
    return as_squash(item[2]) if len(item) > 2 else None


def layer_activations(
    paths: Sequence[str],
    loaded: LoadedTarget,
    layer: LayerSpec,
    transform: Transform,
    batch_size: int,
    workers: int,
    dtype: str = "auto",
) -> np.ndarray:
    """Pooled activations [images, channels] (float32) of one layer of the loaded target on image
    files, preprocessed by the target's `transform`, on the device the target is on."""
    from neuroscribe.activations import ProbeImages, forward_batches
    from neuroscribe.device import resolve_dtype
    from neuroscribe.models import LayerRecorder

    dev = next(loaded.module.parameters()).device
    recorder = LayerRecorder(loaded, [layer])
    out: np.ndarray | None = None
    batches = forward_batches(
        recorder,
        ProbeImages(np.array(paths), transform),
        transform,
        batch_size,
        workers,
        dev,
        resolve_dtype(dtype, dev),
    )
    for index, outputs in batches:
        values = outputs[layer.name].float().cpu().numpy()
        if out is None:
            out = np.empty((len(paths), values.shape[1]), dtype=np.float32)
        out[index.numpy()] = values
    recorder.close()
    return out  # type: ignore[return-value]


class Memo:
    """Features of items (image files, exemplar crops), each item computed once per job.

    `compute(new_items)` returns one feature row per item; `get(items)` computes, in one call,
    those of the items not seen before and returns the rows of all `items` in their order. So an
    image shared by neurons of several parts of a chunk goes through a model once, and a part's
    new items go through it in one batched call when they are asked for together.
    """

    def __init__(self, compute: Callable[[list[Any]], np.ndarray]) -> None:
        self.compute = compute
        self.rows: dict[Hashable, int] = {}
        self.blocks: list[np.ndarray] = []

    def get(self, keys: Sequence[Hashable]) -> np.ndarray:
        """The feature rows of `keys` ([len(keys), D]; [0, 0] for no keys)."""
        new = [k for k in dict.fromkeys(keys) if k not in self.rows]
        if new:
            self.blocks = [np.concatenate([*self.blocks, np.asarray(self.compute(new))])]
            self.rows |= {k: len(self.rows) + i for i, k in enumerate(new)}
        if not keys:
            return np.empty((0, 0), dtype=np.float32)
        return self.blocks[0][[self.rows[k] for k in keys]]
