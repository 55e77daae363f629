"""A named caption dataset for training TExplain's translator (`texplain.captions`): a CSV or
Parquet file list with image paths and captions, checked at parse time, its images screened as
probe images are (`probe.build_manifest`), its features extracted by the activation machinery."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from neuroscribe.config import FILELIST_SUFFIXES, ConfigError, DatasetSpec
from neuroscribe.probe import build_manifest, image_id
from neuroscribe.tables import write_table

log = logging.getLogger(__name__)
SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
KEY = "texplain.captions"
DATASET = "texplain-captions"  # the image ids' dataset name


def _columns(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        return list(pq.read_schema(path).names)
    return list(pd.read_csv(path, nrows=0).columns)


def check_caption_file(captions: dict[str, Any], check_paths: bool) -> None:
    """The file list is a .csv or .parquet that exists and has both columns."""
    path = Path(captions["path"])
    if not captions["path"].endswith(FILELIST_SUFFIXES):
        raise ConfigError(
            f"config key '{KEY}.path': {captions['path']!r} is not a .csv or .parquet file list"
        )
    if not check_paths:
        return
    if not path.is_file():
        raise ConfigError(
            f"config key '{KEY}.path': the caption file {captions['path']!r} does not exist"
        )
    columns = _columns(path)
    for key in ("path_column", "caption_column"):
        if captions[key] not in columns:
            raise ConfigError(
                f"config key '{KEY}.{key}': the caption file {captions['path']!r} has no column "
                f"{captions[key]!r} (columns: {', '.join(map(str, columns))}); set {KEY}.{key}"
            )


def _absolute(listing: Path, raw: object) -> str:
    path = Path(str(raw))
    return str(path if path.is_absolute() else listing.parent / path)


def caption_dataset(
    path: str,
    path_column: str,
    caption_column: str,
    out: str | Path,
    manifest: str | Path,
    rejected: str | Path,
    workers: int = 1,
    resize: int = 256,
) -> None:
    """The stage: the caption file's readable images as a manifest (the probe's format, for the
    feature extraction) and their captions as `texplain/captions.parquet`, every caption of an
    image kept (COCO has five). Rows without a caption are left out and counted; unreadable
    images are listed in `rejected`."""
    listing = Path(path)
    table = (
        pd.read_parquet(listing)
        if listing.suffix == ".parquet"
        else pd.read_csv(listing, dtype=str)
    )
    table = table[table[path_column].notna()]
    images = [_absolute(listing, raw) for raw in table[path_column]]
    # each image once (the probe's screening would reject a repeated path as a duplicate)
    unique = Path(out).with_name(f".{Path(out).stem}-images.csv")
    unique.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"path": list(dict.fromkeys(images))}).to_csv(unique, index=False)
    try:
        spec = DatasetSpec(DATASET, "filelist", str(unique), label_column="")
        kept, dropped = build_manifest(
            [spec], Path(out).parent, manifest, rejected, workers, resize
        )
    finally:
        unique.unlink()
    readable = set(pd.read_parquet(manifest, columns=["image_id"])["image_id"].astype(str))
    pairs = pd.DataFrame(
        {
            "image_id": [image_id(DATASET, p) for p in images],
            "caption": table[caption_column].to_numpy(),
        }
    )
    pairs = pairs[pairs["image_id"].isin(readable)]
    text = pairs["caption"].astype("string").str.strip()
    usable = text.notna() & (text != "")
    if not usable.any():
        raise ValueError(
            f"the caption file {path!r} has no readable image with a caption in column "
            f"{caption_column!r} ({kept} readable images, {dropped} rejected: see {rejected})"
        )
    pairs = pairs[usable.to_numpy()].assign(
        caption=text[usable].astype(str), captioner=f"file:{listing.name}"
    )
    write_table(pairs.reset_index(drop=True), out, SCHEMAS / "texplain_captions.schema.yaml")
    log.info(
        "%d captions of %d images from %s (%d rows without a caption, %d images unreadable: "
        "see %s)",
        len(pairs),
        pairs["image_id"].nunique(),
        path,
        int((~usable).sum()),
        dropped,
        rejected,
    )
