"""Check a LLaVA-Med data file without training: every problem counted, not just the first.

Reads any supported file (alignment, instruct or VQA; JSON list or JSONL), or a parquet / Hub dataset of VQA
rows (:func:`check_table`, rows read by :mod:`qlora_med.data.tables`), opens every distinct image once (as
training would decode it: embedded images from their bytes), and tokenizes every conversation with the stage
template to report the token-length distribution, image tokens included. A record is *unusable* when training would
reject it (the one rule set of :func:`~qlora_med.data.records.inspect_record` that training applies too: turns,
``<image>`` only in the first human turn, the image inside the image folder, answer_type in a VQA file; duplicate
ids; unreadable images or images over ``max_image_pixels``; invalid JSON or UTF-8 lines) or when ``max_length``
leaves no room for its image or answer tokens; samples that are merely longer than ``max_length`` are truncated,
and only counted. The tokenizer, image tokens and chat format are the model's as training reads them
(:func:`qlora_med.data.model_text.load_model_text`).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qlora_med.config.stages import STAGE_PRESETS
from qlora_med.data.encoder import IMAGE_CUT, NO_ANSWER, BatchEncoder, EncodeSpec
from qlora_med.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, load_image
from qlora_med.data.model_text import DEFAULT_IMAGE_TOKENS
from qlora_med.data.reading import file_layout
from qlora_med.data.records import (
    IMAGE_TOKEN,
    ImageFolder,
    InvalidJSON,
    RecordRules,
    detect_format,
    inspect_record,
    iter_json_objects,
)
from qlora_med.errors import DataError
from qlora_med.prompts.chat_render import ChatFormat

LABELS = {  # reason -> how the report names it, in report order
    "invalid_json": "invalid JSON lines",
    "invalid_utf8": "lines not valid UTF-8",
    "not_an_object": "not a JSON object",
    "empty_conversations": "no conversations",
    "role_order": "role-order problems",
    "empty_turn": "empty turns",
    "no_image_token": "records without <image>",
    "image_token": "<image> misplaced/repeated",
    "no_image_field": "no `image` field",
    "image_outside": "image outside the folder",
    "missing_image": "image missing",
    "unreadable_image": "image unreadable",
    "image_too_large": "image over max pixels",
    "answer_type": "no OPEN/CLOSED answer_type",
    "duplicate_id": "duplicate ids",
    IMAGE_CUT: "image tokens beyond max_length",
    NO_ANSWER: "no answer token within max_length",
}
STRUCTURE = {"not_an_object", "empty_conversations", "role_order", "empty_turn"}  # cannot be tokenized
KIND_OF_FORMAT = {"alignment": "align", "instruct": "instruct", "vqa": "vqa"}
EMBEDDED = "embedded:"  # prefix of an embedded image's key (its bytes' SHA-1)


@dataclass
class CheckReport:
    """What ``data check`` found in one file."""

    path: str
    format: str = ""
    layout: str = ""
    template: str = ""
    max_length: int = 2048
    num_image_tokens: int = DEFAULT_IMAGE_TOKENS
    records: int = 0
    turns: int = 0
    images_found: int = 0  # distinct image files
    images_missing: int = 0
    images_unreadable: int = 0
    images_too_large: int = 0  # over max_image_pixels (or a decompression bomb): refused from the header
    problems: Counter = field(default_factory=Counter)  # reason -> records
    unusable: int = 0
    first_unusable: list[str] = field(default_factory=list)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def ok(self) -> bool:
        return self.unusable == 0

    @property
    def over_max_length(self) -> int:
        return int((self.lengths > self.max_length).sum())

    def text(self) -> str:
        """The human-readable report."""
        rows = [
            ("file", f"{self.path} ({self.layout}, {self.format} format)"),
            ("records", f"{self.records} ({self.turns} turns)"),
            ("images", f"{self.images_found} found, {self.images_missing} missing, "
                       f"{self.images_unreadable} unreadable"
                       + (f", {self.images_too_large} too large" if self.images_too_large else "")
                       + " (distinct images, each opened)"),
        ]
        for reason, label in LABELS.items():
            if reason in ("no_image_token", "role_order", "duplicate_id") or self.problems[reason]:
                rows.append((label, str(self.problems[reason])))
        if len(self.lengths):
            q = np.quantile(self.lengths, [0, 0.5, 0.9, 0.99, 1]).astype(int)
            rows.append(("tokens", f"min {q[0]}  p50 {q[1]}  p90 {q[2]}  p99 {q[3]}  max {q[4]}  "
                                   f"(template {self.template}, {self.num_image_tokens} image tokens)"))
            rows.append(("> max_length", f"{self.over_max_length} of {len(self.lengths)} "
                                         f"(truncated to {self.max_length})"))
        rows.append(("unusable records", str(self.unusable)))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.first_unusable:
            lines.append(f"first unusable records (of {self.unusable}):")
            lines += [f"  {line}" for line in self.first_unusable]
        lines.append("OK: every record is usable" if self.ok else "NOT OK: fix or drop the records above "
                     "(or train with data.on_bad_record: skip)")
        return "\n".join(lines)


def _issues(obj: Any, folder: ImageFolder,
            rules: RecordRules) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None, str | None]:
    """(problems, rounds if the conversation can be rendered, the image's key if the record names one)."""
    found = inspect_record(obj, folder, rules)
    data = obj.get("image_bytes") if isinstance(obj, dict) else None
    if data is not None:  # embedded (parquet/Hub): named by its content, so each distinct image is opened once
        return found.problems, found.rounds, EMBEDDED + hashlib.sha1(data).hexdigest()
    return found.problems, found.rounds, None if found.image is None else str(found.image)


def _probe(image: str | bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[str, str] | None:
    """None when the image (a file, or embedded bytes) decodes as training decodes it, else (reason, why not)."""
    try:
        load_image(image, max_pixels=max_pixels)
    except ImageError as err:
        return err.reason, err.detail
    return None


class _Prober:
    """Opens images as training does; many at once in worker processes (one pool, started when needed)."""

    def __init__(self, workers: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.workers, self.pool, self.probe = workers, None, functools.partial(_probe, max_pixels=max_pixels)

    def __call__(self, images: list[str | bytes]) -> list[tuple[str, str] | None]:
        if self.workers <= 1 or len(images) < 64:
            return [self.probe(i) for i in images]
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers)
        return list(self.pool.map(self.probe, images, chunksize=16))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def check_file(path: str | Path, image_folder: str | Path, tokenizer, template: str | None = None,
               max_length: int = 2048, num_image_tokens: int = DEFAULT_IMAGE_TOKENS, image_token: str = IMAGE_TOKEN,
               workers: int | None = None, listed: int = 10, allow_outside_images: bool = False,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, chat: ChatFormat | None = None) -> CheckReport:
    """Check every record of ``path``; see the module docstring for what counts as unusable. ``chat``: the
    model's chat format, for template ``chat_template``."""
    path, folder = Path(path), Path(image_folder)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    head = []
    for _, obj in iter_json_objects(path, tolerant=True):
        head.append(obj)
        if len(head) == 1000:
            break
    report = CheckReport(str(path), format=detect_format(head), max_length=max_length,
                         num_image_tokens=num_image_tokens, layout=file_layout(path))
    report.template = template or STAGE_PRESETS[KIND_OF_FORMAT[report.format]].template
    encoder = BatchEncoder(tokenizer, EncodeSpec(report.template, num_image_tokens, max_length, image_token, chat))
    rules = RecordRules(report.format == "vqa", allow_outside_images, max_image_pixels)
    return _check(report, iter_json_objects(path, tolerant=True), folder, rules, encoder, workers, listed)


def check_table(source, tokenizer, template: str | None = None, max_length: int = 2048,
                num_image_tokens: int = DEFAULT_IMAGE_TOKENS, image_token: str = IMAGE_TOKEN,
                workers: int | None = None, listed: int = 10, chat: ChatFormat | None = None) -> CheckReport:
    """:func:`check_file` for a parquet or Hub source (a ``DataConfig``), its rows read as VQA records."""
    from qlora_med.data.tables import open_table

    folder = Path(source.image_folder) if source.image_folder is not None else Path.cwd()
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    table = open_table(source)
    report = CheckReport(table.label, format="vqa", max_length=max_length, num_image_tokens=num_image_tokens,
                         layout="Hub dataset" if source.hf else "parquet")
    report.template = template or STAGE_PRESETS[KIND_OF_FORMAT[report.format]].template
    encoder = BatchEncoder(tokenizer, EncodeSpec(report.template, num_image_tokens, max_length, image_token, chat))
    rules = RecordRules(True, source.allow_outside_images, source.max_image_pixels)
    return _check(report, table.rows(), folder, rules, encoder, workers, listed)


def _check(report: CheckReport, objects, folder: Path, rules: RecordRules, encoder: BatchEncoder,
           workers: int | None, listed: int) -> CheckReport:
    """Count every problem of the (number, record) pairs into ``report`` under ``rules``."""
    images_in = ImageFolder(folder, rules.allow_outside_images)
    bad: dict[int, tuple[str, list[tuple[str, str]]]] = {}  # record number -> (id, problems)
    image_users: dict[str, list[tuple[int, str]]] = {}
    seen: set[str] = set()
    lengths: list[np.ndarray] = []
    pending: list[tuple[int, str, list[tuple[str, str]]]] = []
    prober = _Prober(workers or len(os.sched_getaffinity(0)), rules.max_image_pixels)
    embedded: dict[str, bytes] = {}  # embedded images not yet opened (opened 512 at a time, then dropped)
    names: dict[str, str] = {}  # embedded image -> the name its first record gives it
    errors: dict[str, tuple[str, str] | None] = {}  # image -> None when readable, else (reason, why not)

    def flush() -> None:
        out = encoder.encode([rounds for _, _, rounds in pending])
        lengths.append(out.num_tokens)
        for row, (reason, message) in out.problems.items():
            number, rid, _ = pending[row]
            bad.setdefault(number, (rid, []))[1].append((reason, message))
        pending.clear()

    def probe_embedded() -> None:
        errors.update(zip(embedded, prober(list(embedded.values())), strict=True))
        embedded.clear()

    try:
        for number, obj in objects:
            report.records += 1
            if isinstance(obj, InvalidJSON):
                bad[number] = (f"line {number}", [(obj.reason, obj.message.split(": ", 2)[-1])])
                continue
            rid = str(obj.get("id", obj.get("question_id", f"#{number}"))) if isinstance(obj, dict) else f"#{number}"
            issues, rounds, image = _issues(obj, images_in, rules)
            turns = obj.get("conversations", obj.get("conversatons")) if isinstance(obj, dict) else None
            report.turns += len(turns) if isinstance(turns, list) else 0
            if rid in seen:
                issues.append(("duplicate_id", "duplicate id (ids must be unique within a file)"))
            seen.add(rid)
            if issues:
                bad[number] = (rid, issues)
            if image is not None:
                users = image_users.setdefault(image, [])
                users.append((number, rid))
                if image.startswith(EMBEDDED) and len(users) == 1:
                    embedded[image], names[image] = obj["image_bytes"], str(obj.get("image") or image)
                    if len(embedded) == 512:
                        probe_embedded()
            if rounds is not None:
                pending.append((number, rid, rounds))
                if len(pending) == 1000:
                    flush()
        if pending:
            flush()
        probe_embedded()
        files = sorted(p for p in image_users if not p.startswith(EMBEDDED) and Path(p).is_file())
        errors.update(zip(files, prober(files), strict=True))
    finally:
        prober.close()
    report.lengths = np.concatenate(lengths) if lengths else report.lengths
    report.images_found = len(errors)
    report.images_missing = len(image_users) - len(errors)
    for image, error in errors.items():
        if error is not None:
            reason, detail = error
            if reason == "image_too_large":
                report.images_too_large += 1
            else:
                report.images_unreadable += 1
            if image in names:
                detail = detail.replace("embedded image", f"embedded image '{names[image]}'", 1)
            for number, rid in image_users[image]:
                bad.setdefault(number, (rid, []))[1].append((reason, detail))
    for number in sorted(bad):
        rid, issues = bad[number]
        for reason in {reason for reason, _ in issues}:
            report.problems[reason] += 1
        if len(report.first_unusable) < listed:
            report.first_unusable.append(f"{rid} (#{number}): " + "; ".join(f"{r}: {m}" for r, m in issues))
    report.unusable = len(bad)
    return report


def plot_lengths(report: CheckReport, out: Path) -> None:
    """Histogram of token lengths (image tokens included) with max_length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=100)
    if len(report.lengths):
        ax.hist(report.lengths, bins=min(60, max(5, len(np.unique(report.lengths)))), color="tab:blue")
    ax.axvline(report.max_length, color="tab:red", linestyle="--", label=f"max_length {report.max_length}")
    ax.set(xlabel=f"tokens per sample (incl. {report.num_image_tokens} image tokens)", ylabel="samples",
           title=f"{Path(report.path).name}: {len(report.lengths)} samples, {report.over_max_length} truncated")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
