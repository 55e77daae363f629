"""Probe set: list the configured datasets, check every image, write the manifest."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from neuroscribe.config import ConfigError, DatasetSpec
from neuroscribe.tables import write_table
from neuroscribe.world import images_folder

log = logging.getLogger(__name__)
LOGGED_REJECTS = 10


class EmptyProbeError(RuntimeError):
    """No readable image in the whole probe set."""


@dataclass(frozen=True)
class Candidate:
    dataset: str
    path: str  # as it will be opened
    relpath: str  # stable name inside the dataset, used for the image id
    label: str | None


def demo_folder(results: str | Path, dataset: DatasetSpec) -> Path:
    """Where the workflow renders a `demo` dataset (images and annotations, see `world`)."""
    return Path(results) / "probe" / "demo" / dataset.name


def image_id(dataset: str, relpath: str) -> str:
    """Stable across runs and machines: depends only on the dataset name and the path inside it."""
    return hashlib.sha1(f"{dataset}/{relpath}".encode()).hexdigest()[:16]


def _folder_candidates(name: str, root: Path, labels: str) -> list[Candidate]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if filename.startswith("."):
                continue
            full = Path(dirpath) / filename
            rel = full.relative_to(root).as_posix()
            label = rel.split("/", 1)[0] if labels == "subfolder" and "/" in rel else None
            found.append(Candidate(name, str(full), rel, label))
    return sorted(found, key=lambda c: c.relpath)


def _read_filelist(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str)


def _filelist_candidates(ds: DatasetSpec) -> list[Candidate]:
    listing = Path(ds.path)
    table = _read_filelist(listing)
    if ds.path_column not in table.columns:
        raise ConfigError(
            f"file list {ds.path!r} of dataset '{ds.name}' has no column '{ds.path_column}' "
            f"(columns: {', '.join(map(str, table.columns))}); set path_column"
        )
    labels = table[ds.label_column] if ds.label_column in table.columns else None
    out = []
    for i, raw in enumerate(table[ds.path_column]):
        raw = f"<empty path in row {i}>" if pd.isna(raw) else str(raw)
        full = Path(raw) if Path(raw).is_absolute() else listing.parent / raw
        label = None if labels is None or pd.isna(labels.iloc[i]) else str(labels.iloc[i])
        out.append(Candidate(ds.name, str(full), raw, label))
    return out


def list_candidates(datasets: Iterable[DatasetSpec], results: str | Path) -> list[Candidate]:
    """Every file the probe datasets name, in a stable order (dataset order, then path)."""
    out: list[Candidate] = []
    for ds in datasets:
        if ds.type == "folder":
            out += _folder_candidates(ds.name, Path(ds.path), ds.labels)
        elif ds.type == "demo":
            out += _folder_candidates(ds.name, images_folder(demo_folder(results, ds)), "subfolder")
        else:
            out += _filelist_candidates(ds)
    return out


def count_candidates(datasets: Iterable[DatasetSpec]) -> int:
    """How many files the probe will consider, cheaply, when the workflow is parsed.

    Demo datasets do not exist yet at parse time; their size is known from the config.
    """
    total = 0
    for ds in datasets:
        if ds.type == "demo":
            total += ds.n_images
        elif ds.type == "folder":
            total += len(_folder_candidates(ds.name, Path(ds.path), ds.labels))
        else:
            total += len(_read_filelist(Path(ds.path)))
    return total


def load_rgb(path: str) -> Image.Image:
    """Open any image as 8-bit RGB: palette, grayscale, CMYK, alpha and 16-bit images included."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:  # closes the file even when decoding fails
            img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(img, dtype=np.float64)
        # 16-bit modes are always on a 0..65535 scale (a dark 16-bit image must stay dark);
        # a 32-bit "I" image has no fixed scale, so guess from its values
        sixteen = img.mode.startswith("I;16") or (img.mode == "I" and array.max() > 255)
        top = 65535.0 if sixteen else 255.0
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(array, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def check_image(path: str) -> tuple[int, int, str | None]:
    """(width, height, None) for a fully decodable image, else (0, 0, reason)."""
    if not os.path.isfile(path):
        return 0, 0, "file not found"
    try:
        img = load_rgb(path)
        width, height = img.size
    except Exception as exc:
        return 0, 0, f"{type(exc).__name__}: {exc}"
    if width == 0 or height == 0:
        return 0, 0, "image has zero size"
    return width, height, None


def build_manifest(
    datasets: list[DatasetSpec],
    results: str | Path,
    manifest_path: str | Path,
    rejected_path: str | Path,
    workers: int = 1,
) -> tuple[int, int]:
    """Check every candidate (full decode, in `workers` processes); write the manifest and the
    rejected list. Returns (accepted, rejected). An empty probe set is an error."""
    candidates = list_candidates(datasets, results)
    seen: dict[str, str] = {}
    unique: list[Candidate] = []
    rejected: list[dict[str, str]] = []
    for cand in candidates:
        real = os.path.realpath(cand.path)
        if real in seen:
            rejected.append(
                {"dataset": cand.dataset, "path": cand.path, "reason": f"duplicate of {seen[real]}"}
            )
            continue
        seen[real] = f"{cand.dataset}/{cand.relpath}"
        unique.append(cand)
    paths = [c.path for c in unique]
    if workers > 1 and len(paths) > 64:
        with ProcessPoolExecutor(workers) as pool:
            checks = list(pool.map(check_image, paths, chunksize=64))
    else:
        checks = [check_image(p) for p in paths]
    rows = []
    for cand, (width, height, reason) in zip(unique, checks, strict=True):
        if reason is not None:
            rejected.append({"dataset": cand.dataset, "path": cand.path, "reason": reason})
            continue
        rows.append(
            {
                "image_id": image_id(cand.dataset, cand.relpath),
                "path": str(Path(cand.path).resolve()),
                "dataset": cand.dataset,
                "label": cand.label,
                "width": width,
                "height": height,
            }
        )
    # the first few name the problem; a folder of thousands of stray files must not flood the log
    for item in rejected[:LOGGED_REJECTS]:
        log.warning("rejected %s: %s", item["path"], item["reason"])
    if len(rejected) > LOGGED_REJECTS:
        log.warning(
            "... and %d more rejected files, all listed in %s",
            len(rejected) - LOGGED_REJECTS,
            rejected_path,
        )
    if not rows:
        names = ", ".join(f"{d.name} ({d.path or d.type})" for d in datasets)
        raise EmptyProbeError(
            f"the probe set is empty: no readable image in {names} "
            f"({len(candidates)} files found, {len(rejected)} rejected); check the dataset paths"
        )
    write_table(
        pd.DataFrame(rejected, columns=["dataset", "path", "reason"]), rejected_path, "rejected"
    )
    write_table(pd.DataFrame(rows), manifest_path, "manifest")
    log.info("manifest: %d images, %d rejected", len(rows), len(rejected))
    return len(rows), len(rejected)


def shard_rows(n_images: int, shard: int, n_shards: int) -> np.ndarray:
    """Manifest rows of one activation shard: contiguous, near-equal ranges (empty shards allowed)."""
    return np.array_split(np.arange(n_images), n_shards)[shard]
