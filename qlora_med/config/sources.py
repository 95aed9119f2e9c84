"""What kind of data source a ``stages[].data`` entry names, and the rules on its keys (no file access).

Three kinds: a LLaVA-Med JSON list / JSONL file (``path`` + ``image_folder``); local parquet (``path`` is a
``.parquet`` file, a glob or a folder of parquet files); a Hugging Face Hub dataset (``hf: org/name`` with
``split`` and ``revision``). Parquet and Hub sources are tables with one question per row; ``columns`` maps
the kit's fields to their column names, and a field it leaves out takes the first of
:data:`TABLE_COLUMNS` the table has (the defaults fit the Hub copies of VQA-RAD, SLAKE and PathVQA).
Whether a folder is a parquet folder is a filesystem question: ``qlora_med.config.files.is_table_path``.
"""

from __future__ import annotations

import difflib
import glob
import re
from pathlib import PurePath
from typing import Any

# field -> column names tried in order when ``columns`` does not name it
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("image", "img", "img_name", "image_name", "image_path"),
    "question": ("question", "query"),
    "answer": ("answer",),
    "answer_type": ("answer_type",),  # absent: CLOSED for yes/no answers, else OPEN
    "id": ("id", "qid", "question_id"),  # absent: the row's index in its split
    "question_type": ("question_type", "content_type"),
    "language": ("q_lang", "language", "lang"),  # rows are kept when it equals the source's `language`
}
REQUIRED_COLUMNS = ("image", "question", "answer")
# 40 MP (e.g. 8000 x 5000): far above what LLaVA looks at (336 px) and above ordinary medical figures and scans (a few
# MP), while one decode stays about 160 MB (RGBA) and about a second; below PIL's own warning threshold (89 MP)
MAX_IMAGE_PIXELS = 40_000_000
PIL_BOMB_PIXELS = 2 * 89_478_485  # PIL refuses larger images at open (DecompressionBombError), whatever we allow
HUB_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
JSON_SUFFIXES = (".json", ".jsonl")


def source_problems(source: Any, where: str) -> list[str]:
    """The value rules of one data source (``DataConfig``), each naming ``where``."""
    problems = []
    kinds = "path (a JSON/JSONL file, or parquet: a file, glob or folder) or hf (a Hub dataset id org/name)"
    if source.path is None and source.hf is None:
        problems.append(f"{where}: no data: set {kinds}")
    elif source.path is not None and source.hf is not None:
        problems.append(f"{where}: set either {kinds}, not both")
    if source.hf is not None and not (HUB_DATASET_ID.fullmatch(source.hf) and ".." not in source.hf):
        problems.append(
            f"{where}.hf: '{source.hf}' is not a Hub dataset id; write org/name "
            "(e.g. flaviagiammarino/vqa-rad) and put a branch, tag or commit in revision"
        )
    if (
        source.path is not None
        and source.path.lower().endswith(JSON_SUFFIXES)
        and source.image_folder is None
    ):
        problems.append(
            f"{where}.image_folder: required for a JSON/JSONL source "
            "(the folder its records' `image` paths are relative to)"
        )
    if source.path is not None and source.path.lower().endswith(JSON_SUFFIXES) and source.columns:
        problems.append(
            f"{where}.columns: only for parquet and Hub sources (a JSON/JSONL file is in "
            "LLaVA-Med form already)"
        )
    pixels = getattr(source, "max_image_pixels", MAX_IMAGE_PIXELS)
    if isinstance(pixels, bool) or not isinstance(pixels, int) or not 0 < pixels <= PIL_BOMB_PIXELS:
        problems.append(f"{where}.max_image_pixels must be a whole number from 1 to {PIL_BOMB_PIXELS} (PIL refuses "
                        f"larger images as decompression bombs), got {pixels!r}")
    if not isinstance(source.columns, dict):
        problems.append(f"{where}.columns: expected a mapping of field: column name, got {source.columns!r}")
        return problems
    for key, value in source.columns.items():
        if key not in TABLE_COLUMNS:
            near = difflib.get_close_matches(str(key), TABLE_COLUMNS, n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"fields: {list(TABLE_COLUMNS)}"
            problems.append(f"{where}.columns: unknown field '{key}'; {hint}")
        elif not isinstance(value, str) or not value:
            problems.append(f"{where}.columns.{key}: expected a column name, got {value!r}")
    return problems


def source_label(source: Any) -> str:
    """How messages name the source: its path, or ``hf:org/name@revision (split S)``."""
    if source.hf is not None:
        at = f"@{source.revision}" if source.revision else ""
        return f"hf:{source.hf}{at} (split {source.split})"
    return str(source.path)


def source_name(source: Any) -> str:
    """The default name of a source in logs, stats and cache folders (``vqa-rad-train``, ``train``)."""
    if source.hf is not None:
        return f"{source.hf.rsplit('/', 1)[-1]}-{source.split}"
    path = PurePath(source.path)
    if glob.has_magic(source.path):  # data/vqa_rad/*.parquet -> vqa_rad
        fixed = [p for p in path.parts if not glob.has_magic(p)]
        return PurePath(*fixed).name if fixed else "parquet"
    return path.stem or path.name or "data"
