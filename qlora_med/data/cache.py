"""On-disk cache of tokenized data sources: memory-mapped Arrow files plus a ``manifest.json``.

An entry is ``<cache_dir>/<file stem>-<key digest>/`` where the key holds everything that decides
its content: the data file's SHA-256, the image folder (path and modification time: adding or
removing images there rebuilds), the checks (``on_bad_record``, ``verify_images``, ``max_records``,
``allow_outside_images``, ``max_image_pixels``),
the template, the tokenizer, ``max_length``, ``num_image_tokens`` and the image token. Entries are
written to a temporary folder and renamed when complete, under a file lock (DDP ranks and parallel
runs build once, the others wait and reuse it). Building an entry removes the entries of older
versions of the same data file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import datasets

logger = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when the encoding or the cached columns change (2: legacy-mode prompts; 3: images over
# 2048 px shrunk into the entry, image paths confined to the image folder, the pixel limit)
MANIFEST = "manifest.json"


def file_sha256(path: Path, chunk: int = 1 << 23) -> str:
    """SHA-256 of a file's bytes (about 0.3 s for the 358 MB alignment file)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary, rules, added tokens and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # slow tokenizers: hash the pickled object
        body = datasets.fingerprint.Hasher.hash(tokenizer)
    specials = [type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]
    return hashlib.sha256((json.dumps(specials) + body).encode()).hexdigest()


def entry_dir(cache_dir: Path, source: Path, key: dict[str, Any]) -> Path:
    """The cache folder for ``key`` (a JSON-able mapping that includes the source's hash)."""
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True).encode()).hexdigest()
    return cache_dir / f"{source.stem}-{digest[:16]}"


def read_manifest(entry: Path) -> dict[str, Any] | None:
    """The manifest of a complete entry whose files all exist, else None."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("version") != CACHE_VERSION or not all((entry / f).is_file() for f in manifest["files"]):
        return None
    return manifest


def publish(tmp: Path, entry: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into ``tmp`` and rename it to ``entry`` (replacing an incomplete one)."""
    (tmp / MANIFEST).write_text(json.dumps({"version": CACHE_VERSION, **manifest}, indent=1))
    if entry.exists():
        shutil.rmtree(entry)
    tmp.rename(entry)


def load_entry(entry: Path, manifest: dict[str, Any]) -> datasets.Dataset:
    """The entry's dataset, memory-mapped (workers share the pages; nothing is copied per process)."""
    parts = [datasets.Dataset.from_file(str(entry / f)) for f in manifest["files"]]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def prune_stale(cache_dir: Path, keep: Path, source: str, sha256: str, stem: str | None = None) -> None:
    """Remove entries built from other versions (another SHA-256) of the same data source.

    ``stem``: the entries' folder prefix when it is not the ``source`` file's stem (parquet and Hub sources).
    """
    for other in cache_dir.glob(f"{stem or Path(source).stem}-*"):
        if other == keep or not other.is_dir():
            continue
        manifest = read_manifest(other)
        if manifest is not None and manifest["key"]["source"] == source and manifest["key"]["sha256"] != sha256:
            logger.info("removing stale data cache %s (built from an older %s)", other, source)
            shutil.rmtree(other, ignore_errors=True)
