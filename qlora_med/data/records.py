"""Read LLaVA-Med records (alignment, instruct, VQA; JSON list or JSONL) and check each one.

A record becomes a :class:`Record` with (question, answer) rounds. Problems raise a
:class:`~qlora_med.errors.DataError` naming the file, the record id and the fix, or, with
``on_bad_record="skip"``, are counted and logged by :class:`SkipLog`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
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
    image_bytes: bytes | None = None  # an embedded image (parquet/Hub sources); ``image`` is then its name


class BadRecord(Exception):
    """A record that cannot be used; ``reason`` is a short category for counting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_CHUNK = 1 << 22  # characters read at a time from a JSON list (records are streamed, not loaded at once)
_NON_SPACE = re.compile(r"\S")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class InvalidJSON:
    """A JSONL line that is not valid JSON (yielded instead of raising when ``tolerant``)."""

    message: str


class _ListStream:
    """Reads the items of a JSON list one at a time, keeping only a few MiB of the file in memory."""

    def __init__(self, fh, path: Path) -> None:
        self.fh, self.path = fh, path
        self.buf, self.pos, self.eof = "", 0, False
        self.lines_before, self.col_before = 0, 0  # position of buf[0] in the file

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = self.fh.read(max(_CHUNK, len(self.buf) - self.pos))
        if not chunk:
            self.eof = True
            return False
        newline = self.buf.rfind("\n", 0, self.pos)
        self.lines_before += self.buf.count("\n", 0, self.pos)
        self.col_before = self.pos - newline - 1 if newline >= 0 else self.col_before + self.pos
        self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        return True

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file); ``pos`` points at it."""
        while True:
            match = _NON_SPACE.search(self.buf, self.pos)
            if match:
                self.pos = match.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            if not self._more():
                return ""

    def value(self) -> Any:
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                if self._more():
                    continue
                raise self.error(err.msg, err.pos) from None
            if not isinstance(obj, (dict, list, str)) and len(self.buf) - end < 64 and self._more():
                continue  # a number split by the chunk boundary ("12" of "12.5e3") parses too early
            self.pos = end
            return obj

    def error(self, msg: str, pos: int) -> DataError:
        newline = self.buf.rfind("\n", 0, pos)
        line = self.lines_before + self.buf.count("\n", 0, pos) + 1
        column = pos - newline if newline >= 0 else self.col_before + pos + 1
        return DataError(
            f"{self.path}: invalid JSON at line {line}, column {column}: {msg}. "
            "Fix the file (e.g. `python -m json.tool FILE`) or convert it to JSONL, one record per line."
        )


def _iter_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as fh:
        stream = _ListStream(fh, path)
        stream.peek()
        stream.pos += 1  # the opening '['
        if stream.peek() == "]":
            stream.pos += 1
        else:
            number = 0
            while True:
                number += 1
                stream.peek()
                yield number, stream.value()
                char = stream.peek()
                if char not in (",", "]"):
                    raise stream.error("Expecting ',' delimiter" if char else "Unexpected end of file", stream.pos)
                stream.pos += 1
                if char == "]":
                    break
        if stream.peek():
            raise stream.error("Extra data", stream.pos)


def iter_json_objects(path: Path, tolerant: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield (1-based record number or line, object) from a JSON list or a JSONL file.

    A JSON list is streamed (never held whole in memory). ``tolerant``: an invalid JSONL line
    yields an :class:`InvalidJSON` instead of raising (a broken JSON list always raises).
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(4096).lstrip()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err}") from err
    if head.startswith(b"["):
        yield from _iter_json_list(path)
        return
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                message = (
                    f"{path}: line {lineno}: invalid JSON at column {err.colno}: {err.msg}. "
                    "Each JSONL line must be one complete JSON object."
                )
                if not tolerant:
                    raise DataError(message) from err
                yield lineno, InvalidJSON(message)


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
    image, data = obj.get("image"), obj.get("image_bytes")
    if needs_image:
        if data is None and (not isinstance(image, str) or not image):
            raise BadRecord("no_image_field", "has no 'image' path")
        count = sum(q.count(IMAGE_TOKEN) for q, _ in rounds)
        if IMAGE_TOKEN not in rounds[0][0] or count != 1:
            raise BadRecord(
                "image_token",
                f"needs exactly one '{IMAGE_TOKEN}' in the first human turn (found {count}); "
                f"add '{IMAGE_TOKEN}\\n' before the first question",
            )
        path = Path(image or "") if data is not None else image_folder / image
        if data is None and not path.is_file():
            raise BadRecord("missing_image", f"image '{path}' not found (check data.image_folder)")
    else:
        path = Path(image or "") if data is not None else image_folder / image if isinstance(image, str) else Path()
    extra = {k: v for k, v in obj.items() if k not in {"id", "image", "image_bytes", "conversations", "conversatons"}}
    return Record(rid, path, rounds, obj.get("answer_type"), obj.get("question_type"), extra, data)


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


def iter_records(
    path: str | Path,
    image_folder: str | Path,
    on_bad_record: str = "error",
    max_records: int | None = None,
    skips: SkipLog | None = None,
    verify_images: bool = False,
) -> Iterator[Record]:
    """Yield the checked records of a LLaVA-Med file one at a time (bad ones raise or go to ``skips``).

    ``verify_images`` also opens every image once (unreadable: reason ``unreadable_image``).
    """
    path = Path(path)
    yield from check_records(iter_json_objects(path), path, Path(image_folder), on_bad_record, max_records, skips,
                             verify_images)


def check_records(
    objects: Iterator[tuple[int, Any]],
    path: str | Path,
    image_folder: Path,
    on_bad_record: str = "error",
    max_records: int | None = None,
    skips: SkipLog | None = None,
    verify_images: bool = False,
) -> Iterator[Record]:
    """:func:`iter_records` over (number, raw record) pairs from any reader; ``path`` names the source."""
    skips = skips if skips is not None else SkipLog(Path(path))
    seen: set[str] = set()
    image_ok: dict[Any, str | None] = {}  # image path or embedded bytes' digest -> None when readable, else why not
    kept = 0
    for number, obj in objects:
        rid = str(obj.get("id", f"#{number}")) if isinstance(obj, dict) else f"#{number}"
        try:
            record = parse_record(obj, image_folder)
            if record.id in seen:
                raise BadRecord("duplicate_id", "duplicate id (ids must be unique within a file)")
            if verify_images:
                key = record.image if record.image_bytes is None else hashlib.sha1(record.image_bytes).digest()
                if key not in image_ok:
                    image_ok[key] = _unreadable(record.image if record.image_bytes is None else record.image_bytes,
                                                record.image)
                if image_ok[key] is not None:
                    raise BadRecord("unreadable_image", image_ok[key])
        except BadRecord as bad:
            if on_bad_record == "error":
                raise DataError(
                    f"{path}: record {rid} (#{number}): {bad}. "
                    "Fix the record, or set data.on_bad_record: skip to drop such records."
                ) from None
            skips.add(rid, bad.reason, str(bad))
            continue
        seen.add(record.id)
        yield record
        kept += 1
        if max_records is not None and kept >= max_records:
            break


def _unreadable(image: Path | bytes, name: Path) -> str | None:
    """None when the image decodes like training will decode it, else the reason."""
    from qlora_med.data.images import load_image

    try:
        load_image(image)
    except DataError as err:
        what = f"image '{name}'" if isinstance(image, Path) else f"embedded image '{name}'"
        return f"{what} is unreadable ({err.__cause__})"
    return None
