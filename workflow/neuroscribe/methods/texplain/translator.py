"""The translator: a frozen classifier's pooled features to k prefix embeddings of a frozen LM.

Two shapes from the nearest public designs: `linear` (LiMBeR: one Linear from the features to
the k prefix embeddings) and `mlp` (ClipCap: Linear, Tanh, Linear, hidden width k·d/2). Inputs
are standardised with the training features' mean and std, kept as buffers so a saved
translator carries them: feature scales differ by orders of magnitude between layers and
targets, and the optimiser's step size should not depend on them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroscribe.io import atomic_path

KINDS = ("linear", "mlp")
MIN_STD = 1e-6  # a constant feature (a dead unit) must not divide by zero


@dataclass(frozen=True)
class TranslatorSpec:
    """What a translator is: its kind and sizes (features in, k prefix tokens of width d out)."""

    kind: str
    in_features: int
    embed_dim: int
    prefix_tokens: int = 10
    hidden: int | None = None  # mlp only; None: (prefix_tokens * embed_dim) // 2, as ClipCap

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"translator kind {self.kind!r}; known: {', '.join(KINDS)}")
        for name in ("in_features", "embed_dim", "prefix_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"translator {name} must be >= 1, got {getattr(self, name)}")
        if self.kind == "mlp" and self.hidden is None:
            # frozen: resolve the default once so to_dict() records the width actually built
            object.__setattr__(self, "hidden", (self.prefix_tokens * self.embed_dim) // 2)
        if self.kind == "linear":
            object.__setattr__(self, "hidden", None)

    @property
    def out_features(self) -> int:
        return self.prefix_tokens * self.embed_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TranslatorSpec:
        return cls(**data)


class Translator(nn.Module):
    """features [B, F] -> prefix embeddings [B, k, d]."""

    def __init__(self, spec: TranslatorSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("feature_mean", torch.zeros(spec.in_features))
        self.register_buffer("feature_std", torch.ones(spec.in_features))
        if spec.kind == "linear":
            self.net: nn.Module = nn.Linear(spec.in_features, spec.out_features)
        else:
            assert spec.hidden is not None
            self.net = nn.Sequential(
                nn.Linear(spec.in_features, spec.hidden),
                nn.Tanh(),
                nn.Linear(spec.hidden, spec.out_features),
            )

    def set_standardisation(self, features: torch.Tensor, chunk_rows: int = 65536) -> None:
        """Mean and std (floored) of the training features [N, F], used on every input.

        Accumulated in float64 over chunks of rows: exact enough for millions of float16
        features, without a float64 copy of them all."""
        total = torch.zeros(features.shape[1], dtype=torch.float64)
        for chunk in features.split(chunk_rows):
            total += chunk.double().sum(0)
        mean = total / len(features)
        squares = torch.zeros_like(total)
        for chunk in features.split(chunk_rows):
            squares += ((chunk.double() - mean) ** 2).sum(0)
        std = (squares / len(features)).sqrt()
        self.feature_mean.copy_(mean.float())
        self.feature_std.copy_(std.clamp_min(MIN_STD).float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.spec.in_features:
            raise ValueError(
                f"translator expects features [batch, {self.spec.in_features}], "
                f"got {list(features.shape)}"
            )
        x = (features.float() - self.feature_mean) / self.feature_std
        out = self.net(x)
        return out.reshape(features.shape[0], self.spec.prefix_tokens, self.spec.embed_dim)


def build_translator(spec: TranslatorSpec) -> Translator:
    """A freshly initialised translator (torch's default init, from the global RNG)."""
    return Translator(spec)


def save_translator(translator: Translator, path: str | Path) -> None:
    """One torch file: the spec (plain dict) and the state dict (weights and standardisation)."""
    state = {k: v.detach().cpu().clone() for k, v in translator.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"spec": translator.spec.to_dict(), "state_dict": state}, tmp)


def load_translator(path: str | Path, device: str | torch.device = "cpu") -> Translator:
    """A translator saved by `save_translator`, in eval mode on `device`."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    translator = build_translator(TranslatorSpec.from_dict(saved["spec"]))
    translator.load_state_dict(saved["state_dict"])
    return translator.to(device).eval()
