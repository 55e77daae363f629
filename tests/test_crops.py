"""Attention crops: Otsu threshold, region boxes, the paper's IoU rules, mapping back to the image,
and re-ranking of images and crops by activation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neuroscribe.activations import ProbeImages
from neuroscribe.backends.captioners import exemplar_view
from neuroscribe.config import Transform
from neuroscribe.crops import (
    MAX_CROPS,
    attention_boxes,
    input_box_to_image,
    iou,
    otsu_threshold,
    region_boxes,
    select_boxes,
    squashed_box_to_image,
)
from neuroscribe.exemplars import Candidate, _ranked


def test_otsu_separates_two_populations() -> None:
    values = np.concatenate([np.full(900, 0.1), np.full(100, 5.0)])
    threshold = otsu_threshold(values)
    assert 0.1 <= threshold < 5.0
    assert otsu_threshold(np.ones(10)) == 1.0


def test_known_blobs_give_their_boxes_largest_first() -> None:
    heat = np.zeros((64, 64))
    heat[5:15, 40:60] = 3.0  # 10 x 20
    heat[30:60, 2:32] = 2.0  # 30 x 30, the largest
    heat[50:54, 50:54] = 4.0  # 4 x 4
    boxes = attention_boxes_from_heat(heat)
    assert boxes == [(2, 30, 32, 60), (40, 5, 60, 15), (50, 50, 54, 54)]


def attention_boxes_from_heat(heat: np.ndarray) -> list[tuple[int, int, int, int]]:
    return select_boxes(region_boxes(heat > otsu_threshold(heat)), heat.shape[0])


def test_iou_rules_and_the_crop_limit() -> None:
    side = 100
    # nearly the whole image: dropped (IoU with the image >= 0.8)
    assert select_boxes([(0, 0, 95, 95)], side) == []
    # overlapping a kept box by IoU > 0.5: dropped; <= 0.5: kept
    kept = select_boxes([(0, 0, 50, 50), (5, 5, 50, 50), (25, 0, 75, 50)], side)
    assert kept == [(0, 0, 50, 50), (25, 0, 75, 50)]
    assert iou((0, 0, 50, 50), (25, 0, 75, 50)) == 1 / 3
    many = [(i * 10, 0, i * 10 + 8, 8) for i in range(7)]
    assert len(select_boxes(many, side)) == MAX_CROPS
    for a in kept:
        assert iou(a, (0, 0, side, side)) < 0.8
        assert all(iou(a, b) <= 0.5 for b in kept if b != a)


def test_coarse_map_is_upsampled_to_the_input() -> None:
    activation_map = np.zeros((8, 8))
    activation_map[0:2, 6:8] = 1.0  # top-right corner of an 8x8 map
    (box,) = attention_boxes(activation_map, 64)
    x0, y0, x1, y1 = box
    assert x0 >= 40 and x1 == 64 and y0 == 0 and y1 <= 24


def test_input_boxes_map_back_through_resize_and_centre_crop() -> None:
    tf = Transform(resize=100, crop=80, mean=(0.5,) * 3, std=(0.5,) * 3)
    # a 400x200 image: scale 0.5 → 200x100, crop 80 leaves margins of 60 (x) and 10 (y)
    assert input_box_to_image((0, 0, 80, 80), 400, 200, tf) == (120, 20, 280, 180)
    assert input_box_to_image((10, 10, 20, 20), 400, 200, tf) == (140, 40, 160, 60)
    identity = Transform(resize=64, crop=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert input_box_to_image((3, 4, 30, 40), 64, 64, identity) == (3, 4, 30, 40)


def test_squashed_boxes_map_back_to_the_image_per_axis() -> None:
    # a 300x50 image squashed to 100x100: x scales by 3, y by 0.5; x0, y0 down, x1, y1 up
    assert squashed_box_to_image((10, 20, 55, 81), 300, 50, 100) == (30, 10, 165, 41)
    assert squashed_box_to_image((0, 0, 100, 100), 300, 50, 100) == (0, 0, 300, 50)
    assert squashed_box_to_image((1, 1, 2, 2), 30, 30, 100) == (0, 0, 1, 1)  # never empty
    # the whole chain: model input (resize 64, crop 56) → the 128x128 squashed image → image
    tf = Transform(resize=64, crop=56, mean=(0.5,) * 3, std=(0.5,) * 3)
    on_squashed = input_box_to_image((0, 0, 56, 56), 128, 128, tf)
    assert on_squashed == (8, 8, 120, 120)  # scale 0.5, margins of 4 on the 64x64 input
    assert squashed_box_to_image(on_squashed, 256, 64, 128) == (16, 4, 240, 60)


def _strip_image(tmp_path: Path) -> tuple[Path, tuple[int, int, int, int]]:
    """A 256x256 grey image with a 200x20 strip: red left end, green middle, blue right end."""
    pixels = np.full((256, 256, 3), 128, dtype=np.uint8)
    pixels[118:138, 28:48] = (255, 0, 0)
    pixels[118:138, 48:208] = (0, 255, 0)
    pixels[118:138, 208:228] = (0, 0, 255)
    path = tmp_path / "strip.png"
    Image.fromarray(pixels).save(path)
    return path, (28, 118, 228, 138)


def _has(pixels: np.ndarray, colour: tuple[int, int, int]) -> bool:
    """Whether some pixel of an [H, W, 3] array is (nearly) `colour`."""
    return bool((np.abs(pixels.astype(int) - colour).max(axis=-1) < 40).any())


def test_a_thin_crop_squashed_keeps_both_ends_and_centre_cropped_loses_them(
    tmp_path: Path,
) -> None:
    path, box = _strip_image(tmp_path)
    tf = Transform(resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    # today's view: resize the 200x20 strip's shorter side to 32 (320x32), centre crop 32x32
    cropped = ProbeImages([str(path)], tf, [box])[0][0].permute(1, 2, 0).numpy()
    assert cropped.shape == (32, 32, 3)
    assert _has(cropped, green) and not _has(cropped, red) and not _has(cropped, blue)
    # squashed to 32x32 first (a global squash, or one per item): both ends are in the view
    for squash in (32, [32]):
        squashed = ProbeImages([str(path)], tf, [box], squash=squash)[0][0]
        view = squashed.permute(1, 2, 0).numpy()
        assert _has(view[:, :4], red) and _has(view[:, -4:], blue) and _has(view, green)
    # and it is the exemplar's view that every stage uses
    image = Image.open(path).convert("RGB")
    same = np.asarray(exemplar_view(image, box, 32))
    np.testing.assert_array_equal(same, view)
    assert exemplar_view(image, box, None).size == (200, 20)
    assert exemplar_view(image, None, 40).size == (40, 40)


def test_reranking_mixes_images_and_crops_by_activation() -> None:
    images = [Candidate(0, r, f"i{r}", None, a) for r, a in [(1, 5.0), (2, 3.0), (3, 1.0)]]
    crops = [Candidate(0, 2, "i2", (0, 0, 4, 4), 4.0), Candidate(0, 1, "i1", (1, 1, 5, 5), 5.0)]
    ranked = _ranked(images + crops, 3)
    assert [(c.row, c.box) for c in ranked] == [(1, None), (1, (1, 1, 5, 5)), (2, (0, 0, 4, 4))]


def test_outer_8_regions_follow_the_reference_on_a_map_with_a_hole() -> None:
    from neuroscribe.crops import region_boxes

    mask = np.zeros((10, 10), dtype=bool)
    mask[1:6, 1:6] = True
    mask[2:5, 2:5] = False  # a ring ...
    mask[3, 3] = True  # ... with an island in its hole
    mask[7, 7] = True  # a pixel and a square that touch only at a corner
    mask[8:10, 8:10] = True
    # neuroscribe: every 4-connected region, the island too; diagonal neighbours stay apart
    assert region_boxes(mask, "connected-4") == [
        (1, 1, 6, 6),
        (8, 8, 10, 10),
        (3, 3, 4, 4),
        (7, 7, 8, 8),
    ]
    # the reference (findContours, RETR_EXTERNAL, 8-connected): the island is inside the ring's
    # outer contour, and the pixel and the square touching at a corner are one region
    assert region_boxes(mask, "outer-8") == [(1, 1, 6, 6), (7, 7, 10, 10)]
    with pytest.raises(ValueError, match="crop regions 'outer-4'"):
        region_boxes(mask, "outer-4")
