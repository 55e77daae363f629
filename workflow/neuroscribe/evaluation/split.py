"""The held-out split of the probe set: a pure function of each image's id.

An image is held out when the first 8 bytes of sha256(image id), read as a fraction of 2**64,
fall below the holdout fraction. Image ids are stable across runs and machines (they hash the
dataset name and the path inside it), so the split is too, and a larger fraction holds out a
superset of a smaller one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def heldout_mask(image_ids: Iterable[str | bytes], fraction: float) -> np.ndarray:
    """True for each image held out at `fraction` (0: none)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction {fraction} is not in [0, 1)")
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in image_ids]
    if fraction == 0:
        return np.zeros(len(ids), dtype=bool)
    limit = fraction * 2**64
    return np.array(
        [int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") < limit for i in ids],
        dtype=bool,
    )
