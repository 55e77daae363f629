"""Probe set: list the configured datasets, check every image, write the manifest."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from neuroscribe.config import ConfigError, DatasetSpec
from neuroscribe.paths import RunPaths
from neuroscribe.tables import write_table

log = logging.getLogger(__name__)
LOGGED_REJECTS = 10
DEFAULT_RESIZE = 256  # the config schema's default `transform.resize`
# The largest image, in pixels, that resizing a probe image's shorter side may make (torchvision's
# Resize, as `activations.image_transform` does). Ordinary photos (aspect ratio up to ~3:1) stay
# far below it: 0.2 megapixels at 256 px. It is reached only by strips of aspect ratio 244:1 at
# 256 px (15:1 at 1024 px), of which the centre crop sees under 0.5 %, and it already costs
# 64 MB per DataLoader worker (Pillow keeps RGB in 4 bytes a pixel), twice while resizing.
MAX_RESIZED_PIXELS = 16_000_000


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
    return Path(RunPaths(Path(results).as_posix()).demo_folder(dataset.name))


def images_folder(root: str | Path) -> Path:
    """Where a demo world rendered into `root` keeps its images (class subfolders); the probe
    set lists a `demo` dataset from there, and `demo.world.render_world` writes there."""
    return Path(root) / "images"


def image_id(dataset: str, relpath: str) -> str:
    """Stable across runs and machines: depends only on the dataset name and the path inside it."""
    return hashlib.sha1(f"{dataset}/{relpath}".encode()).hexdigest()[:16]


def _folder_files(root: Path) -> list[tuple[str, str]]:
    """(path inside `root`, full path) of every visible file under `root`, sorted by the first."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for filename in filenames:
            if not filename.startswith("."):
                full = base / filename
                found.append((full.relative_to(root).as_posix(), str(full)))
    return sorted(found)


def _folder_candidates(name: str, root: Path, labels: str) -> list[Candidate]:
    found = []
    for rel, full in _folder_files(root):
        label = rel.split("/", 1)[0] if labels == "subfolder" and "/" in rel else None
        found.append(Candidate(name, full, rel, label))
    return found


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


@dataclass(frozen=True)
class ProbeSurvey:
    """What the workflow knows of the probe set when it is parsed: a listing and one `stat` per
    file, no file opened."""

    files: int
    image_files: int  # files whose extension is one Pillow can open
    # changes when a file is added, removed, renamed or rewritten (size or mtime), so the rule
    # that builds the manifest can rerun on it; demo datasets are left out (see survey_probe)
    fingerprint: str


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of the formats Pillow can open."""
    registered = Image.registered_extensions()  # loads Pillow's plugins once: ~40 ms
    return frozenset(ext for ext, fmt in registered.items() if fmt in Image.OPEN)


def _stamp(name: str, path: str) -> bytes:
    """A file's name, size and mtime, for the fingerprint; a file that cannot be stat'ed counts
    as missing (the manifest rejects it, and its appearance later changes the fingerprint)."""
    try:
        st = os.stat(path)
        stamp = f"{st.st_size} {st.st_mtime_ns}"
    except OSError:
        stamp = "missing"
    # fsencode: a name that is not valid UTF-8 (lone surrogates in Python) still hashes
    return os.fsencode(name) + b"\0" + stamp.encode() + b"\n"


def _dataset_files(ds: DatasetSpec) -> list[tuple[str, str]]:
    """(name in the dataset, path) of each file of a folder or file-list dataset."""
    if ds.type == "folder":
        return _folder_files(Path(ds.path))
    return [(c.relpath, c.path) for c in _filelist_candidates(ds)]


def survey_probe(datasets: Iterable[DatasetSpec]) -> ProbeSurvey:
    """Count the probe's files, and those with image extensions, and fingerprint them, cheaply
    enough to run every time the workflow is parsed.

    Demo datasets do not exist yet at parse time: their size is known from the config, and
    their content follows from it (the config is in the manifest rule's params, and the rendered
    folder is its input), so they add nothing to the fingerprint.
    """
    digest = hashlib.sha256()
    files = image_files = 0
    extensions = image_extensions()
    for ds in datasets:
        digest.update(f"{ds.name}\0{ds.type}\n".encode())
        if ds.type == "demo":
            files += ds.n_images
            image_files += ds.n_images
            continue
        if ds.type == "filelist":
            digest.update(_stamp(ds.path, ds.path))  # an edited list is a changed probe set
        entries = _dataset_files(ds)
        for name, path in entries:
            digest.update(_stamp(name, path))
        files += len(entries)
        image_files += sum(os.path.splitext(n)[1].lower() in extensions for n, _ in entries)
    return ProbeSurvey(files, image_files, digest.hexdigest())


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


class ImageCheck(NamedTuple):
    """What `check_image` found out about one file."""

    width: int
    height: int
    digest: str  # of the file's bytes, to find the same picture under two names
    reason: str | None  # why the image cannot be used; None when it can


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) after torchvision's `Resize(resize)`: the shorter side becomes `resize`,
    the longer one keeps the aspect ratio (rounded down, as torchvision does)."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def _resize_problem(width: int, height: int, resize: int) -> str | None:
    """Why resizing would make an image too large (a thin decompression bomb), or None."""
    new_width, new_height = resized_size(width, height, resize)
    if new_width * new_height <= MAX_RESIZED_PIXELS:
        return None
    ratio = max(width, height) / min(width, height)
    return (
        f"aspect ratio {ratio:.0f}:1 ({width}×{height}): resizing the shorter side to {resize} px "
        f"would make a {new_width}×{new_height} image ({new_width * new_height / 1e6:,.0f} "
        f"megapixels, over the limit of {MAX_RESIZED_PIXELS / 1e6:.0f}); crop it to a less "
        "elongated shape or remove it"
    )


def file_digest(path: str) -> str:
    """Hash of a file's bytes. blake2b: fast on any CPU (sha256 is fast only on CPUs with the
    SHA extensions, which many cluster Xeons lack); 128 bits are plenty to tell files apart."""
    digest = hashlib.blake2b(digest_size=16)
    # in 1 MiB pieces, so a stray video in the probe folder is never read into memory whole
    # (hashlib.file_digest zeroes a 256 KiB buffer per call: twice as slow on small images)
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def check_image(path: str, resize: int = DEFAULT_RESIZE) -> ImageCheck:
    """Decode the whole image and hash its bytes; `reason` says why it cannot be used, if so.
    `resize` is the largest shorter side the targets resize images to."""
    if not os.path.isfile(path):
        return ImageCheck(0, 0, "", "file not found")
    try:
        digest = file_digest(path)
        img = load_rgb(path)
        width, height = img.size
    except Exception as exc:
        return ImageCheck(0, 0, "", f"{type(exc).__name__}: {exc}")
    if width == 0 or height == 0:
        return ImageCheck(0, 0, digest, "image has zero size")
    problem = _resize_problem(width, height, resize)
    if problem is not None:
        return ImageCheck(0, 0, digest, problem)
    return ImageCheck(width, height, digest, None)


def readable_path(path: str) -> str:
    """A path as valid UTF-8 text: bytes that are not UTF-8 are written as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode turned undecodable bytes into lone surrogates
        return False
    return True


def _name_problem(path: str, real: str) -> str | None:
    """Why a file's name cannot go into the manifest (a Parquet table holds UTF-8 text only)."""
    if not _is_utf8(path):
        return "file name is not valid UTF-8; rename it"
    if not _is_utf8(real):
        return f"it links to {readable_path(real)}, whose name is not valid UTF-8; rename that file"
    return None


def _rejection(cand: Candidate, reason: str) -> dict[str, str]:
    return {"dataset": cand.dataset, "path": readable_path(cand.path), "reason": reason}


def _screen_paths(
    candidates: list[Candidate],
) -> tuple[list[tuple[Candidate, str]], list[dict[str, str]]]:
    """Candidates with a usable name whose file no earlier candidate names (symlinks, `..`, two
    datasets over one folder), each with its real path; and the rejections of the others."""
    seen: dict[str, str] = {}
    kept: list[tuple[Candidate, str]] = []
    rejected: list[dict[str, str]] = []
    for cand in candidates:
        real = os.path.realpath(cand.path)
        reason = _name_problem(cand.path, real)
        if reason is None and real in seen:
            reason = f"duplicate of {seen[real]}"
        if reason is not None:
            rejected.append(_rejection(cand, reason))
            continue
        seen[real] = f"{cand.dataset}/{cand.relpath}"
        kept.append((cand, real))
    return kept, rejected


def _check_all(paths: list[str], resize: int, workers: int) -> list[ImageCheck]:
    check = functools.partial(check_image, resize=resize)
    if workers > 1 and len(paths) > 64:
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(check, paths, chunksize=64))
    return [check(p) for p in paths]


def _log_rejected(rejected: list[dict[str, str]], rejected_path: str | Path) -> None:
    # the first few name the problem; a folder of thousands of stray files must not flood the log
    for item in rejected[:LOGGED_REJECTS]:
        log.warning("rejected %s: %s", item["path"], item["reason"])
    if len(rejected) > LOGGED_REJECTS:
        log.warning(
            "... and %d more rejected files, all listed in %s",
            len(rejected) - LOGGED_REJECTS,
            rejected_path,
        )


def build_manifest(
    datasets: list[DatasetSpec],
    results: str | Path,
    manifest_path: str | Path,
    rejected_path: str | Path,
    workers: int = 1,
    resize: int = DEFAULT_RESIZE,
) -> tuple[int, int]:
    """Check every candidate (full decode and a hash of its bytes, in `workers` processes);
    write the manifest and the rejected list. `resize` is the largest `transform.resize` of the
    targets. Of byte-identical files the first (dataset order, then path) is kept. Returns
    (accepted, rejected). An empty probe set is an error."""
    candidates = list_candidates(datasets, results)
    kept, rejected = _screen_paths(candidates)
    checks = _check_all([cand.path for cand, _ in kept], resize, workers)
    first_with: dict[str, str] = {}  # content digest -> the first file that has it
    rows = []
    for (cand, real), check in zip(kept, checks, strict=True):
        reason = check.reason
        if reason is None and check.digest in first_with:
            reason = f"same content as {first_with[check.digest]}"
        if reason is not None:
            rejected.append(_rejection(cand, reason))
            continue
        first_with[check.digest] = f"{cand.dataset}/{cand.relpath}"
        rows.append(
            {
                "image_id": image_id(cand.dataset, cand.relpath),
                "path": real,
                "dataset": cand.dataset,
                "label": cand.label,
                "width": check.width,
                "height": check.height,
            }
        )
    _log_rejected(rejected, rejected_path)
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
