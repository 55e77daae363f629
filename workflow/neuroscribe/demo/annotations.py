"""The demo world's annotations: loaded by image id, and read as captions (captioner `annotations`).

`render_world` writes one annotation row per image (relpath, label, caption, background and the
objects with their boxes); `load_annotations` reads those of several worlds with the image ids the
probe manifest gives their images. `AnnotationCaptioner` answers the captioner role from them,
`AnnotationSimulator` the evaluation's simulator role.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from neuroscribe.backends.captioners import CaptionRequest
from neuroscribe.backends.simulators import ProbeImage, Simulation, unusable
from neuroscribe.demo.world import BACKGROUND_WORDS, WorldObject, annotations_path
from neuroscribe.probe import image_id

# an object counts as inside a crop when at least this share of its box lies in the crop
INSIDE_SHARE = 0.5


def load_annotations(worlds: Iterable[tuple[str, str | Path]]) -> pd.DataFrame:
    """The annotations of (dataset name, world folder) pairs, one table with an `image_id` column
    holding the ids the probe manifest computes for the images."""
    frames = []
    for dataset, root in worlds:
        table = pd.read_parquet(annotations_path(root))
        table["image_id"] = [image_id(dataset, rel) for rel in table["relpath"]]
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


class MissingAnnotation(KeyError):
    """An exemplar's image has no annotation, so the annotations captioner cannot describe it."""


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
        return cls(load_annotations(roots))

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
        return " and ".join(f"a {WorldObject.from_record(o).phrase()}" for o in inside)


class AnnotationSimulator:
    """The demo world's exact simulator: 1 where an image's annotation carries the label's
    concept, else 0. The label is read with the world's own vocabulary (`parse_concept`); an
    image carries it when one of its objects has every object attribute the label names
    (shape, colour, texture, size) and its background is the one the label names, if any.
    Over class names (`predict_classes`), only the shape can be compared."""

    id = "annotations"

    def __init__(self, worlds: Iterable[tuple[str, str | Path]]) -> None:
        table = load_annotations(worlds)
        self._scenes = {
            row["image_id"]: (list(row["objects"]), row["background"])
            for row in table.to_dict("records")
        }

    def _carries(self, image_id: str, fixed: dict[str, str]) -> float:
        scene = self._scenes.get(image_id)
        if scene is None:
            return float("nan")
        objects, background = scene
        if "background" in fixed and fixed["background"] != background:
            return 0.0
        wanted = {k: v for k, v in fixed.items() if k != "background"}
        if not wanted:
            return 1.0
        return float(any(all(o[k] == v for k, v in wanted.items()) for o in objects))

    def predict(self, labels: Sequence[str], images: Sequence[ProbeImage]) -> Simulation:
        from neuroscribe.backends.synthesizers import UnrenderableConcept
        from neuroscribe.demo.renderer import parse_concept

        predictions = np.full((len(labels), len(images)), np.nan, dtype=np.float32)
        reasons: list[str | None] = []
        for j, label in enumerate(labels):
            why = unusable(label)
            if why is None:
                try:
                    fixed = parse_concept(label).fixed
                except UnrenderableConcept:
                    why = f"no word of the demo world's vocabulary in {label!r}"
            reasons.append(why)
            if why is None:
                predictions[j] = [self._carries(i.image_id, fixed) for i in images]
        missing = [i.image_id for i in images if i.image_id not in self._scenes]
        if missing:
            raise MissingAnnotation(
                f"{len(missing)} evaluation images have no annotation (first: {missing[0]}); "
                "the `annotations` simulator needs a probe set of demo worlds only"
            )
        return Simulation(predictions, reasons)

    def predict_classes(self, labels: Sequence[str], classes: Sequence[str]) -> Simulation:
        """Class names as items (TeLLMe's weight-based variant). The demo's classes are shapes,
        and a class name carries only its shape, so the one attribute compared is the shape: 1
        where the label's shape is the class's, else 0. A label naming no shape (only a colour,
        say) gets NaN and a reason; a class name naming no shape raises ValueError."""
        from neuroscribe.backends.synthesizers import UnrenderableConcept
        from neuroscribe.demo.renderer import parse_concept

        shapes = []
        for name in classes:
            try:
                shape = parse_concept(name).shape
            except UnrenderableConcept:
                shape = None
            if shape is None:
                raise ValueError(
                    f"class name {name!r} names no shape of the demo world; the `annotations` "
                    "simulator reads class names as shapes (a demo model's classes)"
                )
            shapes.append(shape)
        predictions = np.full((len(labels), len(classes)), np.nan, dtype=np.float32)
        reasons: list[str | None] = []
        for j, label in enumerate(labels):
            why = unusable(label)
            shape = None
            if why is None:
                try:
                    shape = parse_concept(label).shape
                except UnrenderableConcept:
                    why = f"no word of the demo world's vocabulary in {label!r}"
                else:
                    if shape is None:
                        why = "the label names no shape; classes are shapes"
            reasons.append(why)
            if why is None:
                predictions[j] = [float(shape == s) for s in shapes]
        return Simulation(predictions, reasons)
