"""Convert the public VQA-RAD, SLAKE and PathVQA releases to LLaVA-Med VQA JSON.

Output (``DIR``): ``train.json``, ``test.json`` and ``val.json`` when the source has a validation split,
each a JSON list of ``{"id", "image", "answer_type", "question_type", "conversations"}`` with the human
turn ``"<question>\\n<image>"`` and the gpt turn the answer; images go under ``DIR/images`` (copied, or
hard-linked where the file system allows it, else copied: a symlink would point out of the image folder, which
training refuses), and ``image`` is relative to that folder. A record naming an image outside its release's image
folder (an absolute path, ``..``, a symlink to elsewhere) is refused: the converter reads only files inside ``SRC``.

Source layouts:

- **VQA-RAD** (``SRC`` = the release folder or its JSON file): one JSON list with ``image_name``,
  ``question``, ``answer``, ``answer_type`` (OPEN/CLOSED), ``question_type``, ``phrase_type``; the
  test split is every record whose ``phrase_type`` starts with ``test``. Images are looked up in the
  JSON's folder and its immediate sub-folders (e.g. ``VQA_RAD Image Folder/``).
- **SLAKE** (``SRC`` = the ``Slake1.0`` folder): ``train.json``, ``validate.json`` (optional),
  ``test.json`` with ``img_name`` (e.g. ``xmlab102/source.jpg``), ``question``, ``answer``,
  ``answer_type``, ``content_type`` (→ ``question_type``), ``q_lang`` (only ``en`` is kept); images
  under ``imgs/``.
- **PathVQA** (``SRC`` = the ``pvqa`` folder of the original release): ``qas/{train,val,test}/
  {split}_qa.pkl`` (or ``.json`` with the same content), each a list of ``{"image": "train_0422",
  "question", "answer"}``; images ``images/{split}/{image}.jpg``. ``answer_type`` is CLOSED for yes/no
  answers, OPEN otherwise; ``question_type`` is the question's first word. Pickles are read with an
  unpickler that refuses every class, so only plain lists/dicts/strings load.

Ids are the source ``qid`` when every record of a split has a distinct one, else the record's index.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_med.data.reading import load_json_text
from qlora_med.errors import DataError

logger = logging.getLogger(__name__)

DATASETS = ("vqa-rad", "slake", "pathvqa")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class SourceQA:
    """One question from a source release, before conversion."""

    qid: Any
    image_src: Path  # the file in the source release
    image_rel: str  # path relative to DIR/images
    question: str
    answer: str
    answer_type: str  # OPEN | CLOSED
    question_type: str


@dataclass(frozen=True)
class SplitSummary:
    """What was written for one split."""

    file: Path
    questions: int
    open: int
    closed: int
    images: int


@dataclass
class ConvertResult:
    """Summary of one conversion."""

    dataset: str
    out_dir: Path
    splits: dict[str, SplitSummary]
    skipped: int = 0  # records left out on purpose (non-English SLAKE questions)


def _field(rec: dict[str, Any], key: str, where: str) -> Any:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    value = rec.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: missing field {key!r}")
    return value


def _answer_type(value: Any, where: str) -> str:
    answer_type = str(value).strip().upper()
    if answer_type not in ("OPEN", "CLOSED"):
        raise DataError(f"{where}: answer_type must be OPEN or CLOSED, got {value!r}")
    return answer_type


def _load_json_list(path: Path) -> list[Any]:
    data = load_json_text(path)  # UTF-8 (a BOM is fine), not a Git LFS pointer, valid JSON
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return data


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle_list(path: Path) -> list[Any]:
    try:
        with path.open("rb") as fh:
            data = _PlainUnpickler(fh).load()
    except pickle.UnpicklingError as err:
        raise DataError(
            f"{path}: {err}; only plain lists/dicts/strings are read: convert it to {path.with_suffix('.json')}"
        ) from err
    except (OSError, EOFError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records")
    return data


def _inside(folder: Path, name: str, where: str) -> tuple[Path, str]:
    """(``folder / name``, that path relative to ``folder``), refusing a name that leads out of ``folder``."""
    rel = os.path.normpath(name)
    path = folder / rel
    root, real = os.path.realpath(folder), os.path.realpath(path)
    if os.path.isabs(name) or rel == os.pardir or rel.startswith(os.pardir + os.sep) or not (
        real == root or real.startswith(root.rstrip(os.sep) + os.sep)
    ):
        raise DataError(
            f"{where}: image {name!r} resolves to {real}, outside the release's image folder {folder}; the "
            "converter reads only files inside the source folder: fix the record (or move the image there)"
        )
    return path, rel


# --- readers: one per release layout --------------------------------------------------------------


def _read_vqa_rad(src: Path) -> tuple[dict[str, list[SourceQA]], int]:
    if src.is_file():
        json_path = src
    else:
        candidates = sorted(src.glob("*.json"))
        if len(candidates) != 1:
            names = ", ".join(p.name for p in candidates) or "none"
            raise DataError(
                f"{src}: expected exactly one VQA-RAD JSON file, found {names}; pass the file itself"
            )
        json_path = candidates[0]
    root = json_path.parent
    images: dict[str, Path] = {}
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        for path in folder.iterdir():
            if path.suffix.lower() in _IMAGE_SUFFIXES:
                images.setdefault(path.name, path)
    splits: dict[str, list[SourceQA]] = {"train": [], "test": []}
    for i, rec in enumerate(_load_json_list(json_path)):
        where = f"{json_path} record {i}"
        name = str(_field(rec, "image_name", where)).strip()
        if name not in images:
            raise DataError(f"{where}: image {name!r} not found in {root} or its sub-folders")
        _inside(root, str(images[name].relative_to(root)), where)  # a listed file may be a symlink to elsewhere
        split = "test" if str(_field(rec, "phrase_type", where)).startswith("test") else "train"
        splits[split].append(
            SourceQA(
                qid=rec.get("qid"),
                image_src=images[name],
                image_rel=name,
                question=str(_field(rec, "question", where)).strip(),
                answer=str(_field(rec, "answer", where)).strip(),
                answer_type=_answer_type(_field(rec, "answer_type", where), where),
                question_type=str(_field(rec, "question_type", where)).strip(),
            )
        )
    return splits, 0


def _read_slake(src: Path) -> tuple[dict[str, list[SourceQA]], int]:
    files = {"train": src / "train.json", "val": src / "validate.json", "test": src / "test.json"}
    for split in ("train", "test"):
        if not files[split].is_file():
            raise DataError(f"{src}: SLAKE needs {files[split].name} (and optionally validate.json)")
    splits: dict[str, list[SourceQA]] = {}
    skipped = 0
    for split, path in files.items():
        if not path.is_file():
            continue
        splits[split] = []
        for i, rec in enumerate(_load_json_list(path)):
            where = f"{path} record {i}"
            if str(_field(rec, "q_lang", where)).strip().lower() != "en":
                skipped += 1
                continue
            image, name = _inside(src / "imgs", str(_field(rec, "img_name", where)).strip(), where)
            if not image.is_file():
                raise DataError(f"{where}: image {image} not found")
            splits[split].append(
                SourceQA(
                    qid=rec.get("qid"),
                    image_src=image,
                    image_rel=name,
                    question=str(_field(rec, "question", where)).strip(),
                    answer=str(_field(rec, "answer", where)).strip(),
                    answer_type=_answer_type(_field(rec, "answer_type", where), where),
                    question_type=str(_field(rec, "content_type", where)).strip(),
                )
            )
    return splits, skipped


def _find_image(folder: Path, name: str, where: str) -> Path | None:
    direct, name = _inside(folder, name, where)
    if direct.suffix.lower() in _IMAGE_SUFFIXES and direct.is_file():
        return direct
    for suffix in _IMAGE_SUFFIXES:
        path, _ = _inside(folder, name + suffix, where)  # the file itself may be a symlink to elsewhere
        if path.is_file():
            return path
    return None


def _read_pathvqa(src: Path) -> tuple[dict[str, list[SourceQA]], int]:
    splits: dict[str, list[SourceQA]] = {}
    for split in ("train", "val", "test"):
        base = src / "qas" / split / f"{split}_qa"
        path = next((p for p in (base.with_suffix(".pkl"), base.with_suffix(".json")) if p.is_file()), None)
        if path is None:
            if split == "val":
                continue
            raise DataError(f"{src}: PathVQA needs qas/{split}/{split}_qa.pkl (or .json)")
        records = _load_pickle_list(path) if path.suffix == ".pkl" else _load_json_list(path)
        splits[split] = []
        for i, rec in enumerate(records):
            where = f"{path} record {i}"
            name = str(_field(rec, "image", where)).strip()
            image = _find_image(src / "images" / split, name, where)
            if image is None:
                raise DataError(f"{where}: image {name!r} not found in {src / 'images' / split}")
            question = str(_field(rec, "question", where)).strip()
            answer = str(_field(rec, "answer", where)).strip()
            first_word = re.sub(r"[^\w]", "", question.split()[0].lower()) if question.split() else ""
            splits[split].append(
                SourceQA(
                    qid=rec.get("qid"),
                    image_src=image,
                    image_rel=f"{split}/{image.name}",
                    question=question,
                    answer=answer,
                    answer_type="CLOSED" if answer.lower() in ("yes", "no") else "OPEN",
                    question_type=first_word or "unknown",
                )
            )
    return splits, 0


_READERS = {"vqa-rad": _read_vqa_rad, "slake": _read_slake, "pathvqa": _read_pathvqa}


# --- writing --------------------------------------------------------------------------------------


def _place_image(src: Path, dst: Path, link: bool) -> None:
    if dst.is_symlink():  # written by an older version across file systems: it leads out of the image folder
        dst.unlink()
    elif dst.exists():
        if link and os.path.samefile(src, dst):
            return
        if not link and dst.stat().st_size == src.stat().st_size:
            return
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not link:
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError as err:  # another file system: a symlink would lead out of the image folder, so copy
        logger.debug("hard link %s -> %s failed (%s); copying", src, dst, err)
        shutil.copy2(src, dst)


def _record(qid: Any, qa: SourceQA) -> dict[str, Any]:
    return {
        "id": qid,
        "image": qa.image_rel,
        "answer_type": qa.answer_type,
        "question_type": qa.question_type,
        "conversations": [
            {"from": "human", "value": f"{qa.question}\n<image>"},
            {"from": "gpt", "value": qa.answer},
        ],
    }


def _ids(items: list[SourceQA], split: str) -> list[Any]:
    qids = [qa.qid for qa in items]
    if items and all(q is not None for q in qids) and len({str(q) for q in qids}) == len(qids):
        return qids
    if any(q is not None for q in qids):
        logger.warning("%s: source qids are missing or repeated; using record indices as ids", split)
    return list(range(len(items)))


def convert(dataset: str, src: Path, out: Path, link: bool = False) -> ConvertResult:
    """Convert one release at ``src`` into LLaVA-Med VQA JSON files and an image folder under ``out``."""
    if dataset not in _READERS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if not src.exists():
        raise DataError(f"{src} does not exist")
    splits, skipped = _READERS[dataset](src)
    out.mkdir(parents=True, exist_ok=True)
    result = ConvertResult(dataset=dataset, out_dir=out, splits={}, skipped=skipped)
    for split, items in splits.items():
        placed: set[str] = set()
        for qa in items:
            if qa.image_rel not in placed:
                _place_image(qa.image_src, out / "images" / qa.image_rel, link)
                placed.add(qa.image_rel)
        records = [_record(qid, qa) for qid, qa in zip(_ids(items, split), items, strict=True)]
        path = out / f"{split}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        n_closed = sum(1 for qa in items if qa.answer_type == "CLOSED")
        result.splits[split] = SplitSummary(path, len(items), len(items) - n_closed, n_closed, len(placed))
        logger.info("%s: %d questions, %d images -> %s", split, len(items), len(placed), path)
    if skipped:
        logger.info("left out %d non-English questions", skipped)
    return result
