"""Captioner role: text for an exemplar (a whole image or a crop box of it).

Backends share one interface, `caption(requests) -> captions`, and an `id` used in cache keys.
`annotations` reads the probe set's own annotations (the demo world ships them); BLIP comes with
the Describe-and-Dissect stages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from neuroscribe.probe import image_id
from neuroscribe.world import BACKGROUND_WORDS, TEXTURE_WORDS

# an object counts as inside a crop when at least this share of its box lies in the crop
INSIDE_SHARE = 0.5


@dataclass(frozen=True)
class CaptionRequest:
    image_id: str
    path: str
    box: tuple[int, int, int, int] | None = (
        None  # x0, y0, x1, y1 in image pixels; None = whole image
    )


class MissingAnnotation(KeyError):
    """An exemplar's image has no annotation, so the annotations captioner cannot describe it."""


def _phrase(obj: dict[str, Any]) -> str:
    words = [obj["size"], obj["colour"], TEXTURE_WORDS[obj["texture"]], obj["shape"]]
    return " ".join(w for w in words if w)


def _share_inside(obj_box: Sequence[int], crop: Sequence[int]) -> float:
    ix = max(0, min(obj_box[2], crop[2]) - max(obj_box[0], crop[0]))
    iy = max(0, min(obj_box[3], crop[3]) - max(obj_box[1], crop[1]))
    area = (obj_box[2] - obj_box[0]) * (obj_box[3] - obj_box[1])
    return ix * iy / area if area else 0.0


class AnnotationCaptioner:
    """Captions from annotations: the image's own caption, or for a crop, the objects inside it.

    `annotations` has one row per image: image_id, caption, and optionally objects (list of
    {shape, colour, texture, size, box}) and background, as the demo world writes them.
    """

    id = "annotations"

    def __init__(self, annotations: pd.DataFrame) -> None:
        self._rows = {row["image_id"]: row for row in annotations.to_dict("records")}

    @classmethod
    def from_world(cls, roots: Iterable[tuple[str, str | Path]]) -> AnnotationCaptioner:
        """From (dataset name, world folder) pairs; ids as the probe manifest computes them."""
        frames = []
        for dataset, root in roots:
            table = pd.read_parquet(Path(root) / "annotations.parquet")
            table["image_id"] = [image_id(dataset, rel) for rel in table["relpath"]]
            frames.append(table)
        return cls(pd.concat(frames, ignore_index=True))

    def caption(self, requests: Sequence[CaptionRequest]) -> list[str]:
        return [self._caption(r) for r in requests]

    def _caption(self, request: CaptionRequest) -> str:
        row = self._rows.get(request.image_id)
        if row is None:
            raise MissingAnnotation(
                f"image {request.image_id} ({request.path}) has no annotation; the `annotations` "
                "captioner needs a probe set that ships captions (use the blip captioner otherwise)"
            )
        objects = row.get("objects")
        if request.box is None or objects is None:
            return str(row["caption"])
        inside = [o for o in objects if _share_inside(o["box"], request.box) >= INSIDE_SHARE]
        if not inside:
            return f"{BACKGROUND_WORDS[row['background']]} background"
        return " and ".join(f"a {_phrase(o)}" for o in inside)
