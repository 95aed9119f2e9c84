"""A training source's images, screened once while the source is cached (:func:`records.check_records`).

Each distinct image (a file, or embedded bytes) is opened once: its header gives the size, so an image over
``max_image_pixels`` (or one PIL refuses as a decompression bomb) is a record-level problem before anything is
decoded (reason ``image_too_large``), and one that is not an image at all is ``unreadable_image``. With
``verify_images`` every image is also decoded once. An image larger than :data:`~qlora_med.data.images.MAX_SIDE`
is shrunk to it once (:func:`~qlora_med.data.images.shrink_image`, lossless PNG): a file source's copy goes into
the cache entry (``<entry>/images/``) and its row points there, an embedded image's bytes are replaced; the
collator then decodes at most 2048 px per side on every draw instead of the full image. Decoding work runs in
worker processes when there is enough of it.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qlora_med.data.images import MAX_SIDE, ImageError, image_size, load_image, shrink_image

Problem = tuple[str, str]  # (reason, detail)
RECENT = 256  # shrunk embedded images kept in memory for the rows that share them (a window's worth)


@dataclass(frozen=True)
class ShrinkTarget:
    """Where a file source's shrunk images go: written to ``folder``, read from ``final`` once the entry is published."""

    folder: Path
    final: Path


def _key(image: Path | bytes) -> str:
    return str(image) if isinstance(image, Path) else "sha1:" + hashlib.sha1(image).hexdigest()


def _decode_job(job: tuple) -> tuple:
    """Worker: ``("ok", replacement or None)`` or ``("bad", reason, detail)``."""
    image, rid, max_pixels, shrink_to = job
    try:
        if shrink_to is None:
            load_image(image, record_id=rid, max_pixels=max_pixels)
            return ("ok", None)
        data = shrink_image(image, max_pixels, rid)
    except ImageError as err:
        return ("bad", err.reason, err.detail)
    if isinstance(image, Path):
        dest, final = shrink_to
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(data)
        return ("ok", Path(final))
    return ("ok", data)


class ImageScreen:
    """Outcome of each distinct image: a problem, a replacement (shrunk copy) or nothing to change."""

    def __init__(self, max_pixels: int, verify: bool = False, shrink: ShrinkTarget | None = None,
                 workers: int | None = None) -> None:
        self.max_pixels, self.verify, self.shrink = max_pixels, verify, shrink
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.workers = workers if workers is not None else max(1, min(cpus, 8))
        self.outcomes: dict[str, Problem | Path | bool | None] = {}  # True: embedded, shrunk (bytes in _recent)
        self.shrunk = 0  # images replaced by a shrunk copy
        self._recent: OrderedDict[str, bytes] = OrderedDict()  # shrunk embedded images, the last RECENT of them
        self._pool: ProcessPoolExecutor | None = None

    def screen(self, images: list[tuple[Path | bytes, str]]) -> None:
        """Screen the (image, record id) pairs not seen before."""
        jobs, keys = [], []
        for image, rid in images:
            key = _key(image)
            if key in self.outcomes:
                continue
            try:
                width, height = image_size(image, self.max_pixels, rid)
            except ImageError as err:
                self.outcomes[key] = (err.reason, err.detail)
                continue
            self.outcomes[key] = None
            shrink_to = None
            if self.shrink is not None and max(width, height) > MAX_SIDE:
                name = hashlib.sha1(key.encode()).hexdigest()[:24] + ".png"
                # a file: a copy in the entry; embedded: the shrunk bytes replace the original
                shrink_to = (str(self.shrink.folder / name), str(self.shrink.final / name)) if isinstance(
                    image, Path) else ("", "")
            if shrink_to is not None or self.verify:
                jobs.append((image, rid, self.max_pixels, shrink_to))
                keys.append(key)
        if not jobs:
            return
        if self.workers > 1 and len(jobs) > 1:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers)
            results = list(self._pool.map(_decode_job, jobs))
        else:
            results = [_decode_job(job) for job in jobs]
        for key, result in zip(keys, results, strict=True):
            if result[0] == "bad":
                self.outcomes[key] = (result[1], result[2])
            elif isinstance(result[1], bytes):
                self.outcomes[key] = True
                self._remember(key, result[1])
            else:
                self.outcomes[key] = result[1]
            self.shrunk += result[0] == "ok" and result[1] is not None

    def _remember(self, key: str, data: bytes) -> None:
        self._recent[key] = data
        self._recent.move_to_end(key)
        while len(self._recent) > RECENT:
            self._recent.popitem(last=False)

    def apply(self, image: Path | bytes) -> tuple[Problem | None, Path | bytes | None]:
        """(the image's problem, its replacement), for an image already :meth:`screen`-ed."""
        key = _key(image)
        outcome = self.outcomes[key]
        if isinstance(outcome, tuple):
            return outcome, None
        if outcome is True:  # embedded and shrunk: shrunk again if it has left the recent ones (same bytes)
            data = self._recent.get(key)
            if data is None:
                data = _decode_job((image, "?", self.max_pixels, ("", "")))[1]
            self._remember(key, data)
            return None, data
        return None, outcome

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
