"""Reading LLaVA-Med JSON lists and JSONL files: streamed, UTF-8, every problem named by its position.

A JSON list is streamed (a few MiB in memory, never the whole list); a JSONL file is read line by line. Text must
be UTF-8; a UTF-8 byte-order mark is skipped. What is not readable as such is one :class:`DataError` naming the
file, the position and the fix: invalid UTF-8 (line and byte offset), a UTF-16 file, a Git LFS pointer file (the
data was never downloaded: ``git lfs pull``), invalid JSON (line and column).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_med.errors import DataError

_CHUNK = 1 << 22  # characters read at a time from a JSON list (records are streamed, not loaded at once)
_NON_SPACE = re.compile(r"\S")
_DECODER = json.JSONDecoder()
BOM = codecs.BOM_UTF8
LFS_POINTER = b"version https://git-lfs.github.com/spec/"
UTF8_FIX = "re-encode it as UTF-8 (e.g. `iconv -f WINDOWS-1252 -t UTF-8 FILE > FILE.utf8` for a Windows file)"


@dataclass(frozen=True)
class InvalidJSON:
    """A JSONL line that cannot be read (yielded instead of raising when ``tolerant``)."""

    message: str
    reason: str = "invalid_json"  # or invalid_utf8


def lfs_pointer(head: bytes) -> str | None:
    """For the first bytes of a Git LFS pointer file, what it stands for ('12345 bytes'); else None."""
    if not head.startswith(LFS_POINTER):
        return None
    size = re.search(rb"^size (\d+)", head, re.MULTILINE)
    return f"{int(size.group(1))} bytes" if size else "a file"


def text_problem(path: Path, head: bytes) -> DataError | None:
    """Why a file with these first bytes is not UTF-8 JSON text that can be read at all (None: no reason yet)."""
    stands_for = lfs_pointer(head)
    if stands_for is not None:
        return DataError(
            f"{path}: is a Git LFS pointer file (standing for {stands_for} that were never downloaded), not the "
            "data itself: run `git lfs pull` in its repository (or download the file directly)"
        )
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return DataError(f"{path}: is UTF-16 text; JSON data must be UTF-8: {UTF8_FIX.replace('WINDOWS-1252', 'UTF-16')}")
    return None


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err}") from err
    problem = text_problem(path, head)
    if problem is not None:
        raise problem
    return head.removeprefix(BOM).lstrip()


def file_layout(path: Path) -> str:
    """``JSON list`` or ``JSONL``, from the first non-blank character."""
    return "JSON list" if _head(path).startswith(b"[") else "JSONL"


def utf8_error(path: Path) -> DataError:
    """The first invalid UTF-8 of ``path`` as one error naming its line and byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pos, lines = 0, 0
    with path.open("rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                offset = pos - pending + err.start
                line = lines + chunk[: max(0, err.start - pending)].count(b"\n") + 1
                bad = (err.object[err.start : err.end] or b"").hex(" ")
                return DataError(
                    f"{path}: not valid UTF-8 at line {line}, byte offset {offset} (bytes {bad}: {err.reason}); "
                    f"JSON data must be UTF-8: {UTF8_FIX}"
                )
            if not chunk:
                return DataError(f"{path}: not valid UTF-8; {UTF8_FIX}")
            pos, lines = pos + len(chunk), lines + chunk.count(b"\n")


class _ListStream:
    """Reads the items of a JSON list one at a time, keeping only a few MiB of the file in memory."""

    def __init__(self, fh, path: Path) -> None:
        self.fh, self.path = fh, path
        self.buf, self.pos, self.eof = "", 0, False
        self.lines_before, self.col_before = 0, 0  # position of buf[0] in the file

    def _more(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.fh.read(max(_CHUNK, len(self.buf) - self.pos))
        except UnicodeDecodeError:
            raise utf8_error(self.path) from None
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
    with path.open(encoding="utf-8-sig") as fh:  # -sig: a byte-order mark is skipped
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


def _iter_jsonl(path: Path, tolerant: bool) -> Iterator[tuple[int, Any]]:
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(BOM):
                raw, start = raw[len(BOM) :], start + len(BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                message = (
                    f"{path}: line {lineno}: not valid UTF-8 at byte offset {start + err.start} (bytes "
                    f"{raw[err.start : err.end].hex(' ')}: {err.reason}); JSON data must be UTF-8: {UTF8_FIX}"
                )
                if not tolerant:
                    raise DataError(message) from None
                yield lineno, InvalidJSON(message, "invalid_utf8")
                continue
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


def iter_json_objects(path: Path, tolerant: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield (1-based record number or line, object) from a JSON list or a JSONL file.

    A JSON list is streamed (never held whole in memory). ``tolerant``: an unreadable JSONL line (invalid JSON or
    UTF-8) yields an :class:`InvalidJSON` instead of raising (a broken JSON list always raises).
    """
    path = Path(path)
    if _head(path).startswith(b"["):
        yield from _iter_json_list(path)
    else:
        yield from _iter_jsonl(path, tolerant)


def load_json_text(path: Path) -> Any:
    """The whole of a (small) JSON file, with the same checks and messages as :func:`iter_json_objects`."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    problem = text_problem(path, data[:4096])
    if problem is not None:
        raise problem
    try:
        text = data.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError:
        raise utf8_error(path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from err
