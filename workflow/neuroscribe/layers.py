"""Layer names of a target model: the error for a layer that cannot be described, and the valid
names ordered closest first for its message. Torch-free, so planning (`inspection`) and running
(`models`, the similarity backends) share them."""

from __future__ import annotations

import difflib

from neuroscribe.config import ConfigError


class LayerError(ConfigError):
    """A requested layer does not exist in the model or cannot be described."""


def closest_first(wanted: str, names: list[str]) -> list[str]:
    """All `names`, most similar to `wanted` first (ties alphabetical, so messages are stable)."""

    def similarity(name: str) -> float:
        return difflib.SequenceMatcher(None, wanted, name).ratio()

    return sorted(names, key=lambda name: (-similarity(name), name))
