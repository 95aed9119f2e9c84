"""Test-only helpers that used to ship in the package: a list loader of records, the per-record encoder
(a reference for the batch encoder), and small model/batch queries."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from qlora_med.data.records import Record, SkipLog, iter_records
from qlora_med.errors import DataError, QloraMedError
from qlora_med.prompts.templates import IGNORE_INDEX, encode, render

logger = logging.getLogger(__name__)


def load_records(
    path: str | Path,
    image_folder: str | Path,
    on_bad_record: str = "error",
    max_records: int | None = None,
    skips: SkipLog | None = None,
) -> list[Record]:
    """Load and check every record of a LLaVA-Med file."""
    path = Path(path)
    skips = skips if skips is not None else SkipLog(path)
    records = list(iter_records(path, image_folder, on_bad_record, max_records, skips))
    skips.report()
    if not records:
        raise DataError(f"{path}: no usable records")
    return records


@dataclass
class EncodeStats:
    """What happened while encoding a stage's records."""

    records: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)


def encode_records(
    records: list[Record],
    processor,
    template: str,
    num_image_tokens: int,
    max_length: int,
    image_token: str = "<image>",
    source: str = "",
) -> tuple[datasets.Dataset, EncodeStats]:
    """Render, tokenize and mask every record; returns the dataset and counts (truncated, dropped)."""
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids(image_token)
    stats = EncodeStats(records=len(records))
    rows: dict[str, list[Any]] = {"id": [], "image": [], "input_ids": [], "labels": []}
    for record in records:
        rendered = render(template, record.rounds, image_token, tok.bos_token, tok.eos_token)
        try:
            enc = encode(tok, rendered, image_token_id, num_image_tokens, max_length)
        except ValueError as err:
            raise QloraMedError(f"{source}: record {record.id}: {err}") from None
        if all(label == IGNORE_INDEX for label in enc.labels):
            stats.dropped["no_answer_tokens_after_truncation"] += 1
            continue
        stats.truncated += enc.truncated
        stats.lengths.append(len(enc.input_ids))
        rows["id"].append(record.id)
        rows["image"].append(str(record.image))
        rows["input_ids"].append(enc.input_ids)
        rows["labels"].append(enc.labels)
    if stats.truncated:
        logger.warning("%s: %d of %d sample(s) truncated to max_length=%d (image tokens kept)",
                       source, stats.truncated, stats.records, max_length)
    if stats.dropped:
        logger.warning("%s: dropped %s", source, dict(stats.dropped))
    if not rows["id"]:
        raise DataError(f"{source}: no sample has answer tokens within max_length={max_length}")
    return datasets.Dataset.from_dict(rows), stats


def real_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens (image tokens included) of a padded or packed batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def trainable_parameter_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
