"""LLaVA-Med records (alignment, instruct, VQA; JSON list or JSONL) and the one rule set they must meet.

:func:`inspect_record` lists everything wrong with a raw record; ``data check`` reports all of it, training
(:func:`parse_record`, :func:`check_records`) stops at or skips the first problem, so the two never disagree. The
rules: alternating human/gpt turns, none empty; exactly one ``<image>``, in the first human turn (none in an
answer); an ``image`` inside the image folder (absolute paths, ``..`` and symlinks that lead out of it are refused
unless ``allow_outside_images``) that exists; in a VQA file an ``answer_type`` of OPEN or CLOSED (eval score needs
it); ids unique. Problems raise a :class:`~qlora_med.errors.DataError` naming the file, the record and the fix, or,
with ``on_bad_record="skip"``, are counted and logged by :class:`SkipLog`. Images are checked by
:mod:`qlora_med.data.screen`.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from qlora_med.data.images import DEFAULT_MAX_IMAGE_PIXELS
from qlora_med.data.reading import InvalidJSON, iter_json_objects  # noqa: F401  (re-exported for eval)
from qlora_med.data.screen import ImageScreen, ShrinkTarget
from qlora_med.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
ANSWER_TYPES = ("OPEN", "CLOSED")
OUTSIDE_FIX = ("images must be inside the image folder: move the file there, or set data.allow_outside_images: "
               "true (data check: --allow-outside-images) if you mean it")


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


@dataclass(frozen=True)
class RecordRules:
    """What a source's records must meet beyond the fixed rules (module docstring)."""

    vqa: bool = False  # a VQA file: every record needs answer_type OPEN or CLOSED
    allow_outside_images: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def detect_format(objects: list[Any]) -> str:
    """alignment, instruct or vqa, from a sample of records (vqa: some record has an ``answer_type``)."""
    dicts = [o for o in objects if isinstance(o, dict)]
    if any("answer_type" in o for o in dicts):
        return "vqa"
    turns = [o.get("conversations", o.get("conversatons")) for o in dicts]
    if any("domain" in o for o in dicts) or any(isinstance(t, list) and len(t) > 2 for t in turns):
        return "instruct"
    return "alignment"


def file_format(path: Path, sample: int = 1000) -> str:
    """:func:`detect_format` of the first ``sample`` records of a JSON/JSONL file."""
    head = []
    for _, obj in iter_json_objects(Path(path), tolerant=True):
        head.append(obj)
        if len(head) == sample:
            break
    return detect_format(head)


class ImageFolder:
    """The folder a source's ``image`` paths are relative to; :meth:`path` refuses those leading out of it."""

    def __init__(self, folder: str | Path, allow_outside: bool = False) -> None:
        self.folder, self.allow_outside = Path(folder), allow_outside
        self.root = os.path.realpath(self.folder)
        self._real_dirs: dict[str, str] = {}  # directory -> its real path (records share a few directories)

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root.rstrip(os.sep) + os.sep)

    def path(self, name: str) -> Path:
        """``folder / name``; raises :class:`BadRecord` (``image_outside``) when it resolves outside the folder."""
        return self.locate(name)[0]

    def locate(self, name: str) -> tuple[Path, bool]:
        """(:meth:`path`, whether it is a file): one ``lstat`` for a plain file, its directory resolved once."""
        joined = os.path.join(self.folder, name)
        try:
            mode = os.lstat(joined).st_mode
        except (OSError, ValueError):
            mode = None
        is_link = mode is not None and stat.S_ISLNK(mode)
        is_file = mode is not None and (stat.S_ISREG(mode) or (is_link and os.path.isfile(joined)))
        if self.allow_outside:
            return Path(joined), is_file
        directory, base = os.path.split(joined)
        if base in ("", ".", "..") or is_link:
            real = os.path.realpath(joined)
        else:
            real_dir = self._real_dirs.get(directory)
            if real_dir is None:
                real_dir = self._real_dirs[directory] = os.path.realpath(directory)
            real = os.path.join(real_dir, base)
        if self._inside(real):
            return Path(joined), is_file
        if os.path.isabs(name):
            why = "is an absolute path"
        elif not self._inside(os.path.normpath(os.path.join(self.root, name))):
            why = "leads out of it with '..'"
        else:
            why = "is reached through a symlink"
        raise BadRecord("image_outside", f"image '{name}' {why} to {real}, outside the image folder {self.folder}; "
                                         f"{OUTSIDE_FIX}")


@dataclass
class Inspection:
    """What :func:`inspect_record` found: every problem, and what of the record is usable."""

    id: str
    problems: list[tuple[str, str]]  # (reason, message), in the order training meets them
    rounds: list[tuple[str, str]] | None = None  # when the turns can be rendered
    image: Path | None = None  # the image file, when the record names one inside the folder (None: embedded)
    record: Record | None = None  # when there is no problem


def _image_token_problem(roles: list[Any], values: list[Any], roles_ok: bool) -> tuple[str, str] | None:
    counts = [(i, v.count(IMAGE_TOKEN)) for i, v in enumerate(values) if isinstance(v, str)]
    total = sum(c for _, c in counts)
    if total == 0:
        return ("no_image_token", f"needs exactly one '{IMAGE_TOKEN}' in the first human turn (found 0); "
                                  f"add '{IMAGE_TOKEN}\\n' before the first question")
    if not roles_ok or (total == 1 and IMAGE_TOKEN in values[0]):
        return None  # with roles out of order which turn is a question is unclear: role_order says enough
    where = ", ".join(f"turn {i + 1} ({roles[i]})" + (f" x{c}" if c > 1 else "") for i, c in counts if c)
    in_answer = any(c and roles[i] == "gpt" for i, c in counts)
    fix = (f"remove it from the answer: an answer with '{IMAGE_TOKEN}' makes the model's image features and image "
           "tokens disagree" if in_answer else f"keep one, in the first question ('{IMAGE_TOKEN}\\n' before it)")
    if in_answer and IMAGE_TOKEN not in values[0]:
        fix += f", and put '{IMAGE_TOKEN}\\n' before the first question"
    return ("image_token", f"needs exactly one '{IMAGE_TOKEN}' in the first human turn (found {total}: {where}); "
                           f"{fix}")


def _answer_type_problem(obj: dict[str, Any]) -> tuple[str, str] | None:
    value = obj.get("answer_type")
    if value is not None and str(value).strip().upper() in ANSWER_TYPES:
        return None
    what = "has no answer_type" if value is None else f"has answer_type {value!r}"
    return ("answer_type", f"{what}: a VQA file needs OPEN or CLOSED in every record (eval score splits accuracy "
                           "by it); add it (data convert writes it)")


def inspect_record(obj: Any, folder: ImageFolder, rules: RecordRules = RecordRules(),
                   needs_image: bool = True) -> Inspection:
    """Every problem of one raw record under the shared rules (module docstring)."""
    if not isinstance(obj, dict):
        return Inspection("?", [("not_an_object", f"expected a JSON object, got {type(obj).__name__}")])
    rid = str(obj.get("id", obj.get("question_id", "?")))
    problems: list[tuple[str, str]] = []
    turns = obj.get("conversations", obj.get("conversatons"))  # one public file misspells the key
    if not isinstance(turns, list) or not turns:
        problems.append(("empty_conversations", "has no 'conversations' (a non-empty list of turns)"))
        turns = []
    roles = [t.get("from") if isinstance(t, dict) else None for t in turns]
    values = [t.get("value") if isinstance(t, dict) else None for t in turns]
    bad_pair = next((i for i in range(0, len(turns), 2) if roles[i : i + 2] != ["human", "gpt"]), None)
    if bad_pair is not None:
        problems.append(("role_order", f"turn {bad_pair + 1}: expected alternating human/gpt turns starting with "
                                       f"human, got {roles[bad_pair : bad_pair + 2]}"))
    empty = next((i for i, v in enumerate(values) if not (isinstance(v, str) and v.strip())), None)
    if empty is not None:
        problems.append(("empty_turn", f"turn {empty + 1}: empty or non-string 'value'"))
    renderable = not problems
    image, data = obj.get("image"), obj.get("image_bytes")
    path = None
    if needs_image:
        token = _image_token_problem(roles, values, bad_pair is None) if turns else None
        problems += [token] if token else []
        if data is None and not (isinstance(image, str) and image):
            problems.append(("no_image_field", "has no 'image' path"))
        elif data is None:
            try:
                path, is_file = folder.locate(image)
            except BadRecord as bad:
                problems.append((bad.reason, str(bad)))
            else:
                if not is_file:
                    problems.append(("missing_image", f"image '{path}' not found (check data.image_folder)"))
    if rules.vqa:
        problems += [p for p in [_answer_type_problem(obj)] if p]
    rounds = [(values[i], values[i + 1]) for i in range(0, len(turns), 2)] if renderable else None
    found = Inspection(rid, problems, rounds, path)
    if not problems:
        if data is not None:
            where = Path(image or "")
        else:
            where = path if path is not None else folder.folder / image if isinstance(image, str) else Path()
        extra = {k: v for k, v in obj.items()
                 if k not in {"id", "image", "image_bytes", "conversations", "conversatons"}}
        found.record = Record(rid, where, rounds, obj.get("answer_type"), obj.get("question_type"), extra, data)
    return found


def parse_record(obj: Any, image_folder: Path | ImageFolder, needs_image: bool = True,
                 rules: RecordRules = RecordRules()) -> Record:
    """Check one raw record and return it as a :class:`Record` (raises :class:`BadRecord`: the first problem)."""
    folder = image_folder if isinstance(image_folder, ImageFolder) else ImageFolder(image_folder,
                                                                                   rules.allow_outside_images)
    found = inspect_record(obj, folder, rules, needs_image)
    if found.problems:
        raise BadRecord(*found.problems[0])
    return found.record  # type: ignore[return-value]


@dataclass
class SkipLog:
    """Counts skipped records by reason and remembers the first few ids."""

    path: Path
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    shrunk: int = 0  # images larger than MAX_SIDE replaced by a shrunk copy (not a skip)

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
    *,
    allow_outside_images: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    shrink=None,
) -> Iterator[Record]:
    """Yield the checked records of a LLaVA-Med file one at a time (bad ones raise or go to ``skips``).

    The file's format decides the rules (a VQA file: answer_type in every record). Each distinct image is screened
    once by :class:`~qlora_med.data.screen.ImageScreen` (header and pixel limit; ``verify_images``: decoded;
    ``shrink``: images larger than 2048 px shrunk once into that cache folder).
    """
    path = Path(path)
    rules = RecordRules(file_format(path) == "vqa", allow_outside_images, max_image_pixels)
    yield from check_records(iter_json_objects(path), path, Path(image_folder), on_bad_record, max_records, skips,
                             verify_images, rules=rules, shrink=shrink)


def check_records(
    objects: Iterator[tuple[int, Any]],
    path: str | Path,
    image_folder: Path,
    on_bad_record: str = "error",
    max_records: int | None = None,
    skips: SkipLog | None = None,
    verify_images: bool = False,
    *,
    rules: RecordRules = RecordRules(),
    shrink: ShrinkTarget | None = None,
    window: int = 256,
) -> Iterator[Record]:
    """:func:`iter_records` over (number, raw record) pairs from any reader; ``path`` names the source.

    Records are checked ``window`` at a time so that their images can be screened together (in worker processes
    when there is decoding to do), then yielded in order: the first problem still raises, skips are counted in order.
    """
    skips = skips if skips is not None else SkipLog(Path(path))
    folder = ImageFolder(image_folder, rules.allow_outside_images)
    screen = ImageScreen(rules.max_image_pixels, verify_images, shrink)
    objects, seen, kept = iter(objects), set(), 0
    try:
        while max_records is None or kept < max_records:
            batch = list(islice(objects, window if max_records is None else min(window, max_records - kept)))
            if not batch:
                break
            checked: list[tuple[int, str, Record | BadRecord]] = []
            for number, obj in batch:
                rid = str(obj.get("id", f"#{number}")) if isinstance(obj, dict) else f"#{number}"
                try:
                    checked.append((number, rid, parse_record(obj, folder, rules=rules)))
                except BadRecord as bad:
                    checked.append((number, rid, bad))
                    if on_bad_record == "error":
                        break  # it raises below: no image after it needs screening
            screen.screen([(_image_of(item), item.id) for _, _, item in checked if isinstance(item, Record)])
            for number, rid, item in checked:
                if isinstance(item, Record):
                    item = _screened(item, seen, screen)
                if isinstance(item, BadRecord):
                    if on_bad_record == "error":
                        raise DataError(
                            f"{path}: record {rid} (#{number}): {item}. "
                            "Fix the record, or set data.on_bad_record: skip to drop such records."
                        ) from None
                    skips.add(rid, item.reason, str(item))
                    continue
                seen.add(item.id)
                yield item
                kept += 1
                if max_records is not None and kept >= max_records:
                    break
    finally:
        skips.shrunk += screen.shrunk
        screen.close()


def _image_of(record: Record) -> Path | bytes:
    return record.image if record.image_bytes is None else record.image_bytes


def _screened(record: Record, seen: set[str], screen: ImageScreen) -> Record | BadRecord:
    """The record with its image's outcome applied: a duplicate id or an image problem, or its shrunk copy."""
    if record.id in seen:
        return BadRecord("duplicate_id", "duplicate id (ids must be unique within a file)")
    problem, replacement = screen.apply(_image_of(record))
    if problem is not None:
        reason, detail = problem
        if record.image_bytes is not None:
            detail = detail.replace("embedded image", f"embedded image '{record.image}'", 1)
        return BadRecord(reason, detail)
    if isinstance(replacement, Path):
        record.image = replacement
    elif replacement is not None:
        record.image_bytes = replacement
    return record
