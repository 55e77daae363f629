"""Attention crops (Describe-and-Dissect): where in an image a neuron fires, as boxes.

The neuron's spatial map is upsampled to the model's input, thresholded with Otsu's method, and
the bounding boxes of its connected regions, largest first, become crops: at most 4 per image, a
box kept only if its IoU with every kept box is at most 0.5 and its IoU with the whole image is
below 0.8 (a crop that is nearly the whole image adds nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from neuroscribe.config import Transform

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels

# how regions of the thresholded map are found: every 4-connected region (neuroscribe), or the
# outer contours of 8-connected regions (the reference, OpenCV's findContours(RETR_EXTERNAL)):
# diagonal neighbours join, and a region inside another's hole is part of the outer one
REGIONS = ("connected-4", "outer-8")
MAX_CROPS = 4
MAX_IOU_WITH_KEPT = 0.5
MAX_IOU_WITH_IMAGE = 0.8


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximises the between-class variance of `values`.

    Not `skimage.filters.threshold_otsu`: that returns the centre of the best bin where this
    returns its upper edge, so `map > threshold` takes in the upper half of that bin too; on
    random 7x7 maps upsampled to 64 px every mask and 4 crop lists in 10 differ from these.
    """
    flat = values.astype(np.float64).ravel()
    lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        return hi
    counts, edges = np.histogram(flat, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(counts * centres)
    mean_low = mass_low / np.maximum(weight_low, 1)
    mean_high = (mass_low[-1] - mass_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[1:][int(np.argmax(between))])


def iou_matrix(a: Sequence[Box], b: Sequence[Box]) -> np.ndarray:
    """IoU of every box of `a` with every box of `b`, [len(a), len(b)]; 0 where both are empty.

    torchvision's `box_iou` in float64, where the integer areas and their quotient are exact.
    """
    import torch
    from torchvision.ops import box_iou

    def tensor(boxes: Sequence[Box]) -> torch.Tensor:
        return torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)

    return torch.nan_to_num(box_iou(tensor(a), tensor(b)), nan=0.0).numpy()


def iou(a: Box, b: Box) -> float:
    return float(iou_matrix([a], [b])[0, 0])


def region_boxes(mask: np.ndarray, regions: str = "connected-4") -> list[Box]:
    """Bounding boxes of the regions (see REGIONS) of a boolean mask, largest box area first."""
    if regions == "outer-8":
        # an outer contour's box is that of its region with the holes filled; filling holes
        # floods the background 4-connected, the dual of 8-connected foreground
        labels, _ = ndimage.label(ndimage.binary_fill_holes(mask), structure=np.ones((3, 3)))
    elif regions == "connected-4":
        labels, _ = ndimage.label(mask)
    else:
        raise ValueError(f"crop regions {regions!r}: expected one of {', '.join(REGIONS)}")
    boxes = [
        (int(s[1].start), int(s[0].start), int(s[1].stop), int(s[0].stop))
        for s in ndimage.find_objects(labels)
        if s is not None
    ]
    return sorted(boxes, key=lambda b: (-(b[2] - b[0]) * (b[3] - b[1]), b))


def select_boxes(boxes: Sequence[Box], side: int) -> list[Box]:
    """Apply the paper's rules to candidate boxes (largest first) on a side x side input."""
    if not boxes:
        return []
    with_image = iou_matrix(boxes, [(0, 0, side, side)])[:, 0]
    pairwise = iou_matrix(boxes, boxes)
    kept: list[int] = []
    for i in range(len(boxes)):
        if len(kept) == MAX_CROPS:
            break
        if with_image[i] >= MAX_IOU_WITH_IMAGE:
            continue
        if all(pairwise[i, k] <= MAX_IOU_WITH_KEPT for k in kept):
            kept.append(i)
    return [boxes[i] for i in kept]


def upsample(activation_map: np.ndarray, side: int) -> np.ndarray:
    """Bilinear upsampling of an [h, w] map to [side, side] (the model's input)."""
    import torch

    tensor = torch.as_tensor(activation_map, dtype=torch.float32)[None, None]
    out = torch.nn.functional.interpolate(
        tensor, size=(side, side), mode="bilinear", align_corners=False
    )
    return out[0, 0].numpy()


def attention_boxes(
    activation_map: np.ndarray, side: int, regions: str = "connected-4"
) -> list[Box]:
    """Crop boxes, in model-input pixels, where the neuron's map is above its Otsu threshold."""
    heat = upsample(activation_map, side)
    mask = heat > otsu_threshold(heat)
    return select_boxes(region_boxes(mask, regions), side)


def input_box_to_image(box: Box, width: int, height: int, tf: Transform) -> Box:
    """Map a box on the model input (resize shorter side, then centre crop) back to the image."""
    scale = tf.resize / min(width, height)
    resized_w, resized_h = round(width * scale), round(height * scale)
    left = (resized_w - tf.crop) / 2
    top = (resized_h - tf.crop) / 2
    x0, y0, x1, y1 = box
    image_box = (
        int(np.floor((x0 + left) / scale)),
        int(np.floor((y0 + top) / scale)),
        int(np.ceil((x1 + left) / scale)),
        int(np.ceil((y1 + top) / scale)),
    )
    return (
        max(0, image_box[0]),
        max(0, image_box[1]),
        min(width, image_box[2]),
        min(height, image_box[3]),
    )


def squashed_box_to_image(box: Box, width: int, height: int, squash: int) -> Box:
    """Map a box on the image squashed to squash x squash pixels (`crop_squash`) back to the
    width x height image, each axis by its own scale: x0, y0 rounded down and x1, y1 up (exact
    integer arithmetic), clipped to the image."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return (
        max(0, x0 * width // squash),
        max(0, y0 * height // squash),
        min(width, -(-x1 * width // squash)),
        min(height, -(-y1 * height // squash)),
    )
