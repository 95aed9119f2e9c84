"""Read LLaVA-Med records (alignment, instruct, VQA; JSON list or JSONL) and check each one.

A record becomes a :class:`Record` with (question, answer) rounds. Problems raise a
:class:`~qlora_med.errors.DataError` naming the file, the record id and the fix, or, with
``on_bad_record="skip"``, are counted and logged by :class:`SkipLog`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_med.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"


@dataclass
class Record:
    """One training or test sample."""

    id: str
    image: Path
    rounds: list[tuple[str, str]]
    answer_type: str | None = None
    question_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class BadRecord(Exception):
    """A record that cannot be used; ``reason`` is a short category for counting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def iter_json_objects(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (1-based record number or line, object) from a JSON list or a JSONL file."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4096).lstrip()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err}") from err
    if head.startswith(b"["):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}. "
                "Fix the file (e.g. `python -m json.tool FILE`) or convert it to JSONL, one record per line."
            ) from err
        yield from enumerate(data, start=1)
        return
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: line {lineno}: invalid JSON at column {err.colno}: {err.msg}. "
                    "Each JSONL line must be one complete JSON object."
                ) from err


def parse_record(obj: Any, image_folder: Path, needs_image: bool = True) -> Record:
    """Check one raw record and return it as a :class:`Record` (raises :class:`BadRecord`)."""
    if not isinstance(obj, dict):
        raise BadRecord("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    rid = str(obj.get("id", obj.get("question_id", "?")))
    turns = obj.get("conversations", obj.get("conversatons"))  # one public file misspells the key
    if not isinstance(turns, list) or not turns:
        raise BadRecord("empty_conversations", "has no 'conversations' (a non-empty list of turns)")
    rounds: list[tuple[str, str]] = []
    for i in range(0, len(turns), 2):
        pair = turns[i : i + 2]
        roles = [t.get("from") if isinstance(t, dict) else None for t in pair]
        if roles != ["human", "gpt"]:
            raise BadRecord(
                "role_order",
                f"turn {i + 1}: expected alternating human/gpt turns starting with human, got {roles}",
            )
        values = [t.get("value") for t in pair]
        if not all(isinstance(v, str) and v.strip() for v in values):
            raise BadRecord("empty_turn", f"turn {i + 1}: empty or non-string 'value'")
        rounds.append((values[0], values[1]))
    image = obj.get("image")
    if needs_image:
        if not isinstance(image, str) or not image:
            raise BadRecord("no_image_field", "has no 'image' path")
        count = sum(q.count(IMAGE_TOKEN) for q, _ in rounds)
        if IMAGE_TOKEN not in rounds[0][0] or count != 1:
            raise BadRecord(
                "image_token",
                f"needs exactly one '{IMAGE_TOKEN}' in the first human turn (found {count}); "
                f"add '{IMAGE_TOKEN}\\n' before the first question",
            )
        path = image_folder / image
        if not path.is_file():
            raise BadRecord("missing_image", f"image '{path}' not found (check data.image_folder)")
    else:
        path = image_folder / image if isinstance(image, str) else Path()
    extra = {k: v for k, v in obj.items() if k not in {"id", "image", "conversations", "conversatons"}}
    return Record(rid, path, rounds, obj.get("answer_type"), obj.get("question_type"), extra)


@dataclass
class SkipLog:
    """Counts skipped records by reason and remembers the first few ids."""

    path: Path
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, rid: str, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{rid}: {message}")
        logger.debug("%s: skipping record %s: %s", self.path, rid, message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> None:
        if self.total:
            logger.warning(
                "%s: skipped %d record(s) %s; first: %s",
                self.path,
                self.total,
                dict(self.counts),
                "; ".join(self.examples),
            )


def load_records(
    path: str | Path,
    image_folder: str | Path,
    on_bad_record: str = "error",
    max_records: int | None = None,
    skips: SkipLog | None = None,
) -> list[Record]:
    """Load and check every record of a LLaVA-Med file."""
    path, image_folder = Path(path), Path(image_folder)
    skips = skips if skips is not None else SkipLog(path)
    records: list[Record] = []
    seen: set[str] = set()
    for number, obj in iter_json_objects(path):
        rid = str(obj.get("id", f"#{number}")) if isinstance(obj, dict) else f"#{number}"
        try:
            record = parse_record(obj, image_folder)
            if record.id in seen:
                raise BadRecord("duplicate_id", "duplicate id (ids must be unique within a file)")
        except BadRecord as bad:
            if on_bad_record == "error":
                raise DataError(
                    f"{path}: record {rid} (#{number}): {bad}. "
                    "Fix the record, or set data.on_bad_record: skip to drop such records."
                ) from None
            skips.add(rid, bad.reason, str(bad))
            continue
        seen.add(record.id)
        records.append(record)
        if max_records is not None and len(records) >= max_records:
            break
    skips.report()
    if not records:
        raise DataError(f"{path}: no usable records")
    return records
