"""A stage's training set at paper scale: cached Arrow conversion of each source, then weighted mixing.

Per source (``DataConfig``), once: records are streamed from the file and checked by
:func:`~qlora_med.data.records.parse_record` (``on_bad_record`` semantics, skips counted by
reason), written to Arrow, then tokenized with ``Dataset.map(batched=True, num_proc=N)`` into a
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

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from filelock import FileLock

from qlora_med.config.schema import DataConfig, StageConfig
from qlora_med.data import cache
from qlora_med.data.encoder import IMAGE_CUT, NO_ANSWER, SCHEMA, BatchEncoder, EncodeSpec
from qlora_med.data.records import SkipLog, iter_records
from qlora_med.errors import DataError, QloraMedError

logger = logging.getLogger(__name__)

RECORDS_SCHEMA = pa.schema(
    [("id", pa.string()), ("image", pa.string()), ("questions", pa.list_(pa.string())),
     ("answers", pa.list_(pa.string()))]
)
PARALLEL_MIN_RECORDS = 20_000  # below this, worker start-up costs more than it saves


@dataclass
class SourceStats:
    """What became of one data source (also stored in its cache manifest)."""

    name: str
    path: str
    weight: float = 1.0
    records: int = 0  # records that passed the checks
    skipped: dict[str, int] = field(default_factory=dict)  # by reason (on_bad_record: skip)
    skip_examples: list[str] = field(default_factory=list)
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
        ids = table.column("id").to_pylist()
        rounds = [list(zip(q, a, strict=True)) for q, a in
                  zip(table.column("questions").to_pylist(), table.column("answers").to_pylist(), strict=True)]
        out = self.encoder.encode(rounds)
        for row, (reason, message) in out.problems.items():
            if reason == IMAGE_CUT:
                raise QloraMedError(f"{self.source}: record {ids[row]}: {message}")
        keep = pa.array(out.keep)
        return pa.Table.from_arrays(
            [table.column("id").take(keep), table.column("image").take(keep), out.input_ids, out.labels,
             pa.array(out.num_tokens[out.keep].astype(np.int32))],
            schema=SCHEMA,
        )


def _write_records(records, path: Path, batch: int = 10_000) -> int:
    """Stream checked records into an Arrow file; returns how many."""
    n = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, RECORDS_SCHEMA) as writer:
        cols: list[list] = [[], [], [], []]
        for record in records:
            cols[0].append(record.id)
            cols[1].append(str(record.image))
            cols[2].append([q for q, _ in record.rounds])
            cols[3].append([a for _, a in record.rounds])
            n += 1
            if len(cols[0]) == batch:
                writer.write_batch(pa.record_batch(cols, schema=RECORDS_SCHEMA))
                cols = [[], [], [], []]
        if cols[0] or n == 0:
            writer.write_batch(pa.record_batch(cols, schema=RECORDS_SCHEMA))
    return n


def _convert(cfg: DataConfig, tokenizer, spec: EncodeSpec, tmp: Path, stats: SourceStats,
             num_proc: int | None) -> list[str]:
    """Check, write and tokenize one source into ``tmp``; fills ``stats``; returns the Arrow file names."""
    path = Path(cfg.path)
    start = time.perf_counter()
    skips = SkipLog(path)
    records_file = tmp / "records.arrow"
    stats.records = _write_records(
        iter_records(path, Path(cfg.image_folder).resolve(), cfg.on_bad_record, cfg.max_records, skips,
                     cfg.verify_images),  # absolute image paths: the entry is shared across working dirs
        records_file,
    )
    stats.skipped, stats.skip_examples = dict(skips.counts), list(skips.examples)
    skips.report()
    if not stats.records:
        raise DataError(f"{path}: no usable records")
    stats.check_seconds = round(time.perf_counter() - start, 2)
    parsed = datasets.Dataset.from_file(str(records_file))
    procs = stats.num_proc = num_proc if num_proc is not None else default_num_proc(stats.records)
    encoded = parsed.with_format("arrow").map(
        _EncodeTable(tokenizer, spec, str(path)), batched=True, batch_size=1000,
        num_proc=procs if procs > 1 else None, remove_columns=parsed.column_names,
        cache_file_name=str(tmp / "tokens.arrow"), new_fingerprint=tmp.name,
        features=datasets.Features.from_arrow_schema(SCHEMA), desc=f"tokenizing {path.name}",
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
    restored.name, restored.weight = cfg.name or Path(cfg.path).stem, cfg.weight
    return restored


def encode_source(cfg: DataConfig, tokenizer, spec: EncodeSpec, cache_dir: Path,
                  num_proc: int | None = None) -> tuple[datasets.Dataset, SourceStats]:
    """The cached, tokenized dataset of one source (converted on first use)."""
    start = time.perf_counter()
    path, folder = Path(cfg.path).resolve(), Path(cfg.image_folder).resolve()
    if not path.is_file():
        raise DataError(f"{cfg.path}: data file not found")
    if not folder.is_dir():
        raise DataError(f"{cfg.image_folder}: image folder not found")
    key = {
        "source": str(path), "sha256": cache.file_sha256(path), "image_folder": str(folder),
        "image_folder_mtime_ns": folder.stat().st_mtime_ns, "on_bad_record": cfg.on_bad_record,
        "verify_images": cfg.verify_images, "max_records": cfg.max_records, "template": spec.template,
        "tokenizer": cache.tokenizer_fingerprint(tokenizer), "max_length": spec.max_length,
        "num_image_tokens": spec.num_image_tokens, "image_token": spec.image_token,
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = cache.entry_dir(cache_dir, path, key)
    with FileLock(str(entry) + ".lock"):
        manifest = cache.read_manifest(entry)
        hit = manifest is not None
        if not hit:
            logger.info("converting %s (cache: %s)", cfg.path, entry)
            tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                stats = SourceStats(name="", path=str(path))
                files = _convert(cfg, tokenizer, spec, tmp, stats, num_proc)
                stats.seconds = round(time.perf_counter() - start, 2)
                manifest = {"key": key, "files": files, "stats": stats.__dict__}
                cache.publish(tmp, entry, manifest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            cache.prune_stale(cache_dir, entry, key["source"], key["sha256"])
    dataset = cache.load_entry(entry, manifest)
    stats = _stats_from(cfg, manifest["stats"])
    stats.cache, stats.cache_hit = str(entry), hit
    if hit:
        stats.seconds = round(time.perf_counter() - start, 2)
        if stats.skipped:
            logger.warning("%s: %d record(s) skipped when cached %s; first: %s", cfg.path,
                           sum(stats.skipped.values()), stats.skipped, "; ".join(stats.skip_examples))
    if stats.truncated:
        logger.warning("%s: %d of %d sample(s) truncated to max_length=%d (image tokens kept)",
                       cfg.path, stats.truncated, stats.samples, spec.max_length)
    if stats.dropped:
        logger.warning("%s: dropped %s", cfg.path, stats.dropped)
    if not stats.samples:
        raise DataError(f"{cfg.path}: no sample has answer tokens within max_length={spec.max_length}")
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
    for i, (part, weight) in enumerate(zip(parts, weights, strict=True)):
        indices = draw_indices(len(part), weight, np.random.default_rng([seed, i]))
        part = part if indices is None else part.select(indices, keep_in_memory=True)  # no file in the cache
        drawn.append(part)
        sized.append(len(part))
    return (drawn[0] if len(drawn) == 1 else datasets.concatenate_datasets(drawn)), sized


def build_stage_dataset(stage: StageConfig, processor, num_image_tokens: int, image_token: str, seed: int,
                        cache_dir: str | Path, num_proc: int | None = None) -> tuple[datasets.Dataset, BuildStats]:
    """The stage's training set (id, image, input_ids, labels, num_tokens) and what happened to each source."""
    spec = EncodeSpec(stage.template, num_image_tokens, stage.max_length, image_token)
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
