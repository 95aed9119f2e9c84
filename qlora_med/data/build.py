"""A stage's training set at paper scale: cached Arrow conversion of each source, then weighted mixing.

Per source (``DataConfig``), once: records are streamed from the file and checked by
:func:`~qlora_med.data.records.parse_record` (``on_bad_record`` semantics, skips counted by
reason), their images screened (:mod:`qlora_med.data.screen`: pixel limit, images over 2048 px shrunk once into
the entry), written to Arrow, then tokenized with ``Dataset.map(batched=True, num_proc=N)`` into a
cache entry (:mod:`qlora_med.data.cache`). Later runs memory-map the entry: no record is held as a
Python object, in the trainer or in its DataLoader workers, which decode images per batch
(:class:`~qlora_med.data.collate.VisionCollator`).

Mixing (``stage.data`` a list): source *i* with *n_i* usable samples and weight *w_i* contributes
``k_i = floor(w_i * n_i + 0.5)`` samples: every sample ``floor(k_i / n_i)`` times, plus
``k_i mod n_i`` distinct samples drawn without replacement by ``numpy.random.default_rng([seed, i])``.
So weight 1 uses each sample once, 2 exactly twice, 0.5 a fixed random half; the draw depends only on
the recipe seed, the source's position and its size. Sources are concatenated in recipe order and
the trainer shuffles (seeded) as usual.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from filelock import FileLock

from qlora_med.config.files import is_table_path
from qlora_med.config.schema import DataConfig, StageConfig
from qlora_med.config.sources import source_name
from qlora_med.data import cache
from qlora_med.data.encoder import EMBEDDED_SCHEMA, IMAGE_CUT, NO_ANSWER, SCHEMA, BatchEncoder, EncodeSpec
from qlora_med.data.images import MAX_SIDE
from qlora_med.data.records import Record, RecordRules, SkipLog, check_records, iter_records
from qlora_med.data.screen import ShrinkTarget
from qlora_med.errors import DataError, QloraMedError
from qlora_med.prompts.chat_render import ChatFormat

logger = logging.getLogger(__name__)

RECORDS_SCHEMA = pa.schema(
    [("id", pa.string()), ("image", pa.string()), ("questions", pa.list_(pa.string())),
     ("answers", pa.list_(pa.string()))]
)
EMBEDDED_RECORDS_SCHEMA = RECORDS_SCHEMA.append(pa.field("image_bytes", pa.large_binary()))
PARALLEL_MIN_RECORDS = 20_000  # below this, worker start-up costs more than it saves
BATCH_BYTES = 64 << 20  # image bytes per Arrow batch of an embedded-image source


@dataclass
class SourceStats:
    """What became of one data source (also stored in its cache manifest)."""

    name: str
    path: str
    weight: float = 1.0
    records: int = 0  # records that passed the checks
    skipped: dict[str, int] = field(default_factory=dict)  # by reason (on_bad_record: skip)
    skip_examples: list[str] = field(default_factory=list)
    shrunk: int = 0  # images larger than MAX_SIDE px shrunk once into the cache entry
    dropped: dict[str, int] = field(default_factory=dict)  # encoded but unusable, by reason
    samples: int = 0  # usable samples
    truncated: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # min / p50 / p95 / max, image tokens included
    drawn: int = 0  # samples in the stage's mix
    cache: str = ""
    cache_hit: bool = False
    seconds: float = 0.0  # this load: conversion (check + tokenize) or cached reload
    check_seconds: float = 0.0  # conversion: reading and checking the records
    tokenize_seconds: float = 0.0  # conversion: Dataset.map tokenization
    num_proc: int = 1


@dataclass
class BuildStats:
    """A stage's data: one entry per source, in recipe order."""

    sources: list[SourceStats]
    on_bad_image: str  # the collator's policy: skip only when every source skips bad records

    @property
    def samples(self) -> int:
        return sum(s.drawn for s in self.sources)

    @property
    def truncated(self) -> int:
        return sum(s.truncated for s in self.sources)

    def summary(self) -> str:
        return "; ".join(
            f"{s.name}: {s.drawn} drawn (weight {s.weight:g}) of {s.samples} samples, "
            f"{sum(s.skipped.values())} skipped, {s.truncated} truncated, "
            f"{'cached' if s.cache_hit else 'converted'} in {s.seconds:.1f}s"
            for s in self.sources
        )


def default_num_proc(records: int) -> int:
    """Tokenization processes: the usable CPUs (at most 8), or 1 for small files."""
    if records < PARALLEL_MIN_RECORDS:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, 8))


class _EncodeTable:
    """``Dataset.map`` function: an Arrow batch of checked records -> encoded rows (picklable)."""

    def __init__(self, tokenizer, spec: EncodeSpec, source: str) -> None:
        self.encoder = BatchEncoder(tokenizer, spec)
        self.source = source

    def __call__(self, table: pa.Table) -> pa.Table:
        embedded = "image_bytes" in table.column_names
        ids = table.column("id").to_pylist()
        rounds = [list(zip(q, a, strict=True)) for q, a in
                  zip(table.column("questions").to_pylist(), table.column("answers").to_pylist(), strict=True)]
        out = self.encoder.encode(rounds)
        for row, (reason, message) in out.problems.items():
            if reason == IMAGE_CUT:
                raise QloraMedError(f"{self.source}: record {ids[row]}: {message}")
        keep = pa.array(out.keep)
        columns = [table.column("id").take(keep), table.column("image").take(keep), out.input_ids, out.labels,
                   pa.array(out.num_tokens[out.keep].astype(np.int32))]
        if embedded:
            columns.append(table.column("image_bytes").take(keep))
        return pa.Table.from_arrays(columns, schema=EMBEDDED_SCHEMA if embedded else SCHEMA)


def _write_records(records, path: Path, embedded: bool = False, batch: int = 10_000) -> tuple[int, int]:
    """Stream checked records into an Arrow file; returns how many and their embedded image bytes."""
    n, image_bytes, pending = 0, 0, 0
    schema = EMBEDDED_RECORDS_SCHEMA if embedded else RECORDS_SCHEMA
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        cols: list[list] = [[] for _ in schema]
        for record in records:
            cols[0].append(record.id)
            cols[1].append(str(record.image))
            cols[2].append([q for q, _ in record.rounds])
            cols[3].append([a for _, a in record.rounds])
            if embedded:
                cols[4].append(record.image_bytes)
                pending += len(record.image_bytes or b"")
            n += 1
            if len(cols[0]) == batch or pending >= BATCH_BYTES:
                writer.write_batch(pa.record_batch(cols, schema=schema))
                cols, image_bytes, pending = [[] for _ in schema], image_bytes + pending, 0
        if cols[0] or n == 0:
            writer.write_batch(pa.record_batch(cols, schema=schema))
    return n, image_bytes + pending


@dataclass
class _Source:
    """One data source, ready to convert: how it is named and keyed, and its checked records."""

    label: str  # the file, or hf:org/name (split S), in messages
    stem: str  # cache folder prefix
    key: dict[str, Any]  # what the source is and holds (part of the cache key)
    records: Callable[[SkipLog, ShrinkTarget], Iterator[Record]]
    embedded: bool = False  # rows carry their encoded image (the entry gets an image_bytes column)


def _open_source(cfg: DataConfig) -> _Source:
    """A JSON/JSONL file (keyed by its SHA-256) or a parquet/Hub table (keyed by its Arrow files' SHA-256)."""
    json_file = cfg.hf is None and not is_table_path(cfg.path)
    if json_file and not Path(cfg.path).is_file():
        raise DataError(f"{cfg.path}: data file not found")
    if json_file and cfg.image_folder is None:
        raise DataError(f"{cfg.path}: a JSON/JSONL source needs data.image_folder")
    folder = Path(cfg.image_folder).resolve() if cfg.image_folder is not None else None
    if folder is not None and not folder.is_dir():
        raise DataError(f"{cfg.image_folder}: image folder not found")
    folder_key = {"image_folder": str(folder) if folder else None,
                  "image_folder_mtime_ns": folder.stat().st_mtime_ns if folder else None}
    checks = (cfg.on_bad_record, cfg.max_records)
    limits = {"allow_outside_images": cfg.allow_outside_images, "max_image_pixels": cfg.max_image_pixels}
    if json_file:
        path = Path(cfg.path).resolve()
        return _Source(str(cfg.path), path.stem, {"source": str(path), "sha256": cache.file_sha256(path), **folder_key},
                       lambda skips, shrink: iter_records(path, folder, *checks, skips, cfg.verify_images, **limits,
                                                          shrink=shrink))
    from qlora_med.data.tables import open_table

    table = open_table(cfg)
    key = {"source": table.identity, "sha256": table.content_sha256(), **folder_key, "columns": table.columns,
           "language": cfg.language}
    return _Source(table.label, source_name(cfg), key,
                   lambda skips, shrink: check_records(table.rows(), table.label, folder or Path.cwd(), *checks,
                                                       skips, cfg.verify_images, rules=RecordRules(True, **limits),
                                                       shrink=shrink),
                   embedded=True)


def _convert(source: _Source, tokenizer, spec: EncodeSpec, tmp: Path, entry: Path, stats: SourceStats,
             num_proc: int | None) -> list[str]:
    """Check, write and tokenize one source into ``tmp`` (published as ``entry``); fills ``stats``; returns the
    Arrow file names."""
    start = time.perf_counter()
    skips = SkipLog(Path(source.label))
    records_file = tmp / "records.arrow"
    # absolute image paths: the entry is shared across working dirs; shrunk copies are found at entry/images
    records = source.records(skips, ShrinkTarget(tmp / "images", entry / "images"))
    stats.records, image_bytes = _write_records(records, records_file, source.embedded)
    stats.skipped, stats.skip_examples, stats.shrunk = dict(skips.counts), list(skips.examples), skips.shrunk
    skips.report()
    if stats.shrunk:
        logger.info("%s: %d image(s) larger than %d px shrunk to it once, into the cache (not again on every draw)",
                    source.label, stats.shrunk, MAX_SIDE)
    if not stats.records:
        raise DataError(f"{source.label}: no usable records")
    stats.check_seconds = round(time.perf_counter() - start, 2)
    parsed = datasets.Dataset.from_file(str(records_file))
    procs = stats.num_proc = num_proc if num_proc is not None else default_num_proc(stats.records)
    batch = max(16, min(1000, BATCH_BYTES * stats.records // max(image_bytes, 1)))  # bounded image bytes per batch
    encoded = parsed.with_format("arrow").map(
        _EncodeTable(tokenizer, spec, source.label), batched=True, batch_size=batch,
        num_proc=procs if procs > 1 else None, remove_columns=parsed.column_names,
        cache_file_name=str(tmp / "tokens.arrow"), new_fingerprint=tmp.name,
        features=datasets.Features.from_arrow_schema(EMBEDDED_SCHEMA if source.embedded else SCHEMA),
        desc=f"tokenizing {source.stem}",
    )
    files = [Path(f["filename"]).name for f in encoded.cache_files]
    stats.tokenize_seconds = round(time.perf_counter() - start - stats.check_seconds, 2)
    stats.samples = len(encoded)
    if stats.records > stats.samples:
        stats.dropped = {NO_ANSWER: stats.records - stats.samples}
    num_tokens = encoded.data.column("num_tokens")
    if stats.samples:
        stats.truncated = pc.sum(pc.greater(num_tokens, spec.max_length)).as_py() or 0
        q = np.quantile(num_tokens.to_numpy(), [0.0, 0.5, 0.95, 1.0])
        stats.tokens = dict(zip(["min", "p50", "p95", "max"], (int(v) for v in q), strict=True))
    del encoded, parsed
    records_file.unlink()
    return files


def _stats_from(cfg: DataConfig, stats: dict) -> SourceStats:
    restored = SourceStats(**stats)
    restored.name, restored.weight = cfg.name or source_name(cfg), cfg.weight
    return restored


def encode_source(cfg: DataConfig, tokenizer, spec: EncodeSpec, cache_dir: Path,
                  num_proc: int | None = None) -> tuple[datasets.Dataset, SourceStats]:
    """The cached, tokenized dataset of one source (converted on first use)."""
    start = time.perf_counter()
    source = _open_source(cfg)
    key = {
        **source.key, "on_bad_record": cfg.on_bad_record,
        "verify_images": cfg.verify_images, "allow_outside_images": cfg.allow_outside_images,
        "max_image_pixels": cfg.max_image_pixels, "max_records": cfg.max_records, "template": spec.template,
        "tokenizer": cache.tokenizer_fingerprint(tokenizer), "max_length": spec.max_length,
        "num_image_tokens": spec.num_image_tokens, "image_token": spec.image_token,
    }
    if spec.chat is not None:  # the chat template decides the tokens too
        key["chat"] = dataclasses.asdict(spec.chat)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = cache.entry_dir(cache_dir, Path(source.stem), key)
    with FileLock(str(entry) + ".lock"):
        manifest = cache.read_manifest(entry)
        hit = manifest is not None
        if not hit:
            logger.info("converting %s (cache: %s)", source.label, entry)
            tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                stats = SourceStats(name="", path=key["source"])
                files = _convert(source, tokenizer, spec, tmp, entry, stats, num_proc)
                stats.seconds = round(time.perf_counter() - start, 2)
                manifest = {"key": key, "files": files, "stats": stats.__dict__}
                cache.publish(tmp, entry, manifest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            cache.prune_stale(cache_dir, entry, key["source"], key["sha256"], source.stem)
    dataset = cache.load_entry(entry, manifest)
    stats = _stats_from(cfg, manifest["stats"])
    stats.cache, stats.cache_hit = str(entry), hit
    if hit:
        stats.seconds = round(time.perf_counter() - start, 2)
        if stats.skipped:
            logger.warning("%s: %d record(s) skipped when cached %s; first: %s", source.label,
                           sum(stats.skipped.values()), stats.skipped, "; ".join(stats.skip_examples))
    if stats.truncated:
        logger.warning("%s: %d of %d sample(s) truncated to max_length=%d (image tokens kept)",
                       source.label, stats.truncated, stats.samples, spec.max_length)
    if stats.dropped:
        logger.warning("%s: dropped %s", source.label, stats.dropped)
    if not stats.samples:
        raise DataError(f"{source.label}: no sample has answer tokens within max_length={spec.max_length}")
    return dataset, stats


def draw_indices(n: int, weight: float, rng: np.random.Generator) -> np.ndarray | None:
    """Indices drawn from a source of ``n`` samples (None: all of them, once, in order)."""
    k = math.floor(weight * n + 0.5)
    if k == n:
        return None
    if k == 0:
        raise DataError(f"weight {weight:g} draws no sample from a source of {n}; raise the weight")
    repeats, extra = divmod(k, n)
    chosen = np.concatenate([np.tile(np.arange(n), repeats), rng.choice(n, size=extra, replace=False)])
    return np.sort(chosen)


def mix(parts: list[datasets.Dataset], weights: list[float], seed: int) -> tuple[datasets.Dataset, list[int]]:
    """Concatenate the sources' draws (see the module docstring); returns the dataset and the draw sizes."""
    drawn, sized = [], []
    embedded = any("image_bytes" in part.column_names for part in parts)
    for i, (part, weight) in enumerate(zip(parts, weights, strict=True)):
        indices = draw_indices(len(part), weight, np.random.default_rng([seed, i]))
        part = part if indices is None else part.select(indices, keep_in_memory=True)  # no file in the cache
        if embedded and "image_bytes" not in part.column_names:  # image files beside embedded images: same columns
            part = part.add_column("image_bytes", pa.nulls(len(part), pa.large_binary()),
                                   feature=datasets.Value("large_binary"))
        drawn.append(part)
        sized.append(len(part))
    return (drawn[0] if len(drawn) == 1 else datasets.concatenate_datasets(drawn)), sized


def build_stage_dataset(stage: StageConfig, processor, num_image_tokens: int, image_token: str, seed: int,
                        cache_dir: str | Path, num_proc: int | None = None,
                        chat: ChatFormat | None = None) -> tuple[datasets.Dataset, BuildStats]:
    """The stage's training set (id, image, input_ids, labels, num_tokens) and what happened to each source.
    ``chat``: the model's chat format, for template ``chat_template``."""
    spec = EncodeSpec(stage.template, num_image_tokens, stage.max_length, image_token, chat)
    parts, stats = [], []
    for cfg in stage.data:
        dataset, source_stats = encode_source(cfg, processor.tokenizer, spec, Path(cache_dir), num_proc)
        parts.append(dataset)
        stats.append(source_stats)
    dataset, drawn = mix(parts, [cfg.weight for cfg in stage.data], seed)
    for source_stats, n in zip(stats, drawn, strict=True):
        source_stats.drawn = n
    policy = "skip" if all(cfg.on_bad_record == "skip" for cfg in stage.data) else "error"
    return dataset, BuildStats(stats, policy)
