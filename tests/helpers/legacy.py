"""Test-only helpers that used to ship in the package: a list loader of records, records encoded one at a
time (what the batched build must equal), and small model/batch queries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from qlora_med.data.records import Record, SkipLog, iter_records
from qlora_med.errors import DataError
from qlora_med.prompts.templates import IGNORE_INDEX, encode, render


def load_records(
    path: str | Path,
    image_folder: str | Path,
    on_bad_record: str = "error",
    skips: SkipLog | None = None,
) -> list[Record]:
    """Load and check every record of a LLaVA-Med file."""
    path = Path(path)
    skips = skips if skips is not None else SkipLog(path)
    records = list(iter_records(path, image_folder, on_bad_record, skips=skips))
    skips.report()
    if not records:
        raise DataError(f"{path}: no usable records")
    return records


@dataclass
class EncodeStats:
    """What happened while encoding records one at a time."""

    truncated: int = 0
    dropped: int = 0  # no answer token within max_length


def encode_records(
    records: list[Record],
    processor,
    template: str,
    num_image_tokens: int,
    max_length: int,
) -> tuple[datasets.Dataset, EncodeStats]:
    """Each record rendered and encoded on its own (``templates.encode``); samples without answer tokens
    are dropped, as the build drops them."""
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids("<image>")
    stats = EncodeStats()
    rows: dict[str, list[Any]] = {"id": [], "image": [], "input_ids": [], "labels": []}
    for record in records:
        rendered = render(template, record.rounds, "<image>", tok.bos_token, tok.eos_token)
        enc = encode(tok, rendered, image_token_id, num_image_tokens, max_length)
        if all(label == IGNORE_INDEX for label in enc.labels):
            stats.dropped += 1
            continue
        stats.truncated += enc.truncated
        for column, value in zip(rows, (record.id, str(record.image), enc.input_ids, enc.labels), strict=True):
            rows[column].append(value)
    return datasets.Dataset.from_dict(rows), stats


def real_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens (image tokens included) of a padded or packed batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def trainable_parameter_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
