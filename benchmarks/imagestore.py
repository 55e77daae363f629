"""The image store's own cost: keeping N drawn images (PNG encoding and writing), against the
drawing it overlaps with.

A stand-in drawer returns 512 px photo-like images after `--draw-seconds` per batch (0.25 s: a
one-step model such as the fast preset's SD-Turbo on a fast GPU, batch 16). Everything else is
the package's `ImageStore.ensure` as the synthesis stage calls it. Run it from the repository:

    .venv/bin/python benchmarks/imagestore.py                 # 128 images, ~3 s
    .venv/bin/python benchmarks/imagestore.py --writers 1     # one writer thread
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from neuroscribe.imagestore import ImageRequest, ImageStore


def photo_like(size: int) -> Image.Image:
    # smooth gradients with mild noise: PNG compresses it about as well as a photo
    x = np.linspace(0, 255, size)
    g = np.add.outer(x, x) / 2
    noise = np.random.default_rng(0).normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.stack([g, g[::-1], g.T], -1) + noise, 0, 255).astype("uint8"))


class TimedDrawer:
    id = "benchmark"

    def __init__(self, image: Image.Image, seconds: float) -> None:
        self.image, self.seconds = image, seconds

    def draw(self, requests: Sequence[ImageRequest]) -> list[Image.Image]:
        time.sleep(self.seconds)
        return [self.image.copy() for _ in requests]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--draw-seconds", type=float, default=0.25, help="per batch")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--writers", type=int, default=4)
    args = parser.parse_args()
    drawer = TimedDrawer(photo_like(args.size), args.draw_seconds)
    requests = [ImageRequest("concept", f"prompt {i}", i) for i in range(args.images)]
    with tempfile.TemporaryFile() as warm, tempfile.TemporaryFile() as timed:
        Image.new("RGB", (8, 8)).save(warm, format="PNG")  # the PNG codec loaded first
        encode = time.perf_counter()
        drawer.image.save(timed, format="PNG")
        encode = time.perf_counter() - encode
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        ImageStore(root, writers=args.writers).ensure(drawer, requests, args.batch_size)
        seconds = time.perf_counter() - start
    drawing = -(-args.images // args.batch_size) * args.draw_seconds
    print(
        f"{args.images} images of {args.size} px, batches of {args.batch_size}, "
        f"{args.writers} writer threads: {seconds:.2f} s ({1000 * seconds / args.images:.1f} ms "
        f"per image); drawing alone {drawing:.2f} s, one PNG encoded and written "
        f"{1000 * encode:.1f} ms, serially {drawing + args.images * encode:.2f} s"
    )


if __name__ == "__main__":
    main()
