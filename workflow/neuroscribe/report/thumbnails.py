"""Content-addressed thumbnails: one small JPEG per (source bytes, size), made once.

A thumbnail's name is a hash of its source image's bytes and its size, so a rebuild makes only
the new ones and an edited image gets a new thumbnail. Source digests are remembered by
(path, size, mtime) in `sources.json`, so a rebuild does not reread every image.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from neuroscribe.io import atomic_path

log = logging.getLogger(__name__)
THUMBS = "thumbs"


@dataclass
class ThumbnailStore:
    """Thumbnails under `{report}/thumbs/`, addressed by `thumb(path)` relative to `report`."""

    report: Path
    size: int = 128
    made: int = 0
    reused: int = 0
    missing: list[str] = field(default_factory=list)
    _digests: dict[str, list] = field(default_factory=dict)
    _known: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.report = Path(self.report)
        index = self.report / THUMBS / "sources.json"
        if index.is_file():
            self._digests = json.loads(index.read_text())

    def thumb(self, source: str | Path) -> str | None:
        """The thumbnail of `source` (a path as the run's tables give it), made if new; None
        for an image that is missing or unreadable (listed in `missing`)."""
        key = str(source)
        if key not in self._known:
            self._known[key] = self._make(Path(source))
        return self._known[key]

    def _digest(self, source: Path) -> str:
        stat = source.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        known = self._digests.get(str(source))
        if known is not None and known[:2] == stamp:
            return known[2]
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        self._digests[str(source)] = [*stamp, digest]
        return digest

    def _make(self, source: Path) -> str | None:
        try:
            digest = self._digest(source)
        except OSError as err:
            self.missing.append(f"{source} ({err.strerror})")
            return None
        name = hashlib.sha256(f"{digest}:{self.size}".encode()).hexdigest()[:20]
        relative = f"{THUMBS}/{name[:2]}/{name}.jpg"
        target = self.report / relative
        if target.is_file():
            self.reused += 1
            return relative
        try:
            with Image.open(source) as image:
                image = image.convert("RGB")
                image.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
                with atomic_path(target) as tmp:
                    image.save(tmp, format="JPEG", quality=85)
        except OSError as err:
            self.missing.append(f"{source} ({err})")
            return None
        self.made += 1
        return relative

    def save(self) -> None:
        """Remember the source digests for the next build."""
        with atomic_path(self.report / THUMBS / "sources.json") as tmp:
            tmp.write_text(json.dumps(self._digests))
        log.info("thumbnails: %d made, %d reused", self.made, self.reused)
        for entry in self.missing[:20]:
            log.warning("image not shown (missing or unreadable): %s", entry)
