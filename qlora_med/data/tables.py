"""Parquet files and Hugging Face Hub datasets as data sources: one VQA question per row, images embedded.

A source (``DataConfig`` with ``hf`` or a parquet ``path``, see ``qlora_med.config.sources``) is opened with
``datasets``: ``load_dataset(org/name, split=, revision=)`` for a Hub dataset (downloaded into the HF cache;
``HF_HUB_OFFLINE=1`` reads only what is cached), ``load_dataset("parquet", ...)`` for local files. Either
way the split is a memory-mapped Arrow table in the ``datasets`` cache, read here in batches of rows with
images left as encoded bytes: they are decoded per batch by the collator (training) or per generation batch
(evaluation), never all at once.

Each row becomes a LLaVA-Med VQA record (:meth:`Table.rows`): ``id`` (the id column, else the row's index
in its split), ``image`` (the embedded image's file name, or the path the column holds),
``image_bytes`` (the embedded bytes, or None), ``answer_type`` (the column upper-cased; without the column
CLOSED for yes/no answers, else OPEN, logged once with counts), ``question_type`` and ``conversations``
(``"<question>\\n<image>"``, answer). Columns come from ``DataConfig.columns`` or the defaults of
:data:`~qlora_med.config.sources.TABLE_COLUMNS`; a missing one is one error naming the source, the columns
it has and the ``columns:`` fix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qlora_med.config.files import is_table_path, parquet_files
from qlora_med.config.problems import raise_problems
from qlora_med.config.schema import DataConfig
from qlora_med.config.sources import REQUIRED_COLUMNS, TABLE_COLUMNS, source_label, source_problems
from qlora_med.data.records import IMAGE_TOKEN
from qlora_med.errors import DataError, QloraMedError

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf:"
CLOSED_ANSWERS = ("yes", "no")
BATCH_ROWS = 256  # rows read at a time (images stay encoded bytes)


def infer_answer_type(answer: Any) -> str:
    """CLOSED for a yes/no answer (case and surrounding spaces ignored), else OPEN."""
    return "CLOSED" if str(answer).strip().lower() in CLOSED_ANSWERS else "OPEN"


def cli_source(
    data: str,
    image_folder: str | Path | None = None,
    split: str = "train",
    revision: str | None = None,
    columns: list[str] | None = None,
) -> DataConfig | None:
    """The source a command's data argument names: ``hf:org/name[@revision]`` or a parquet path; None for JSON.

    ``columns`` are ``field=column`` strings (``--column image=img_name``).
    """
    data = str(data)
    if not data.startswith(HUB_PREFIX) and not is_table_path(data):
        if columns:
            raise QloraMedError(f"--column: only for parquet and Hub sources; {data} is a JSON/JSONL file")
        return None
    mapping = {}
    for item in columns or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise QloraMedError(f"--column '{item}': write FIELD=COLUMN, e.g. --column image=img_name")
        mapping[key.strip()] = value.strip()
    hub, at, rev = (
        data.removeprefix(HUB_PREFIX).partition("@") if data.startswith(HUB_PREFIX) else ("", "", "")
    )
    source = DataConfig(
        path=None if hub else data,
        hf=hub or None,
        split=split,
        revision=rev or revision,
        columns=mapping,
        image_folder=None if image_folder is None else str(image_folder),
    )
    if at and not rev:
        raise QloraMedError(f"{data}: empty revision after '@'; write hf:org/name@<branch, tag or commit>")
    raise_problems(source_problems(source, "--data"))
    return source


def _load(source: DataConfig, label: str):
    """The split as a memory-mapped ``datasets.Dataset``; every failure is one line naming the source."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError, DatasetsError

    try:
        if source.hf is not None:
            return datasets.load_dataset(source.hf, split=source.split, revision=source.revision)
        if Path(source.path).is_dir():
            return datasets.load_dataset("parquet", data_dir=source.path, split=source.split)
        files = parquet_files(source.path)
        if not files:
            raise DataError(f"{label}: no parquet file found")
        return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except DatasetNotFoundError as err:
        raise QloraMedError(
            f"{label}: {_first_line(err)} Check the id (org/name, as on the dataset page) and revision; for "
            "a private or gated dataset set HF_TOKEN (or run `hf auth login`) to a token that "
            "can read it"
        ) from None
    except ConnectionError as err:
        if datasets.config.HF_HUB_OFFLINE:
            raise QloraMedError(
                f"{label}: not in the local cache ({datasets.config.HF_DATASETS_CACHE}) and "
                "HF_HUB_OFFLINE=1 forbids downloading it: load it once with network access, "
                "or unset HF_HUB_OFFLINE"
            ) from None
        raise QloraMedError(
            f"{label}: could not reach the Hub ({_first_line(err)}): check the network and HF_ENDPOINT, or "
            "set HF_HUB_OFFLINE=1 to use a cached copy"
        ) from None
    except ValueError as err:
        if "split" in str(err).lower():
            raise DataError(
                f"{label}: {_first_line(err).rstrip('.')}; set split (--split) to one of them"
            ) from None
        raise DataError(f"{label}: cannot read it as parquet: {_first_line(err)}") from None
    except (OSError, pa.ArrowException, DatasetsError) as err:  # no files, a corrupt parquet file, ...
        raise DataError(
            f"{label}: cannot read it as parquet: {type(err).__name__}: {_first_line(err)}"
        ) from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def _image_kind(label: str, column: str, kind: pa.DataType) -> str:
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return "struct"  # a `datasets` Image column: {bytes, path}
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "path"
    raise DataError(
        f"{label}: column '{column}' ({kind}) holds no images: expected embedded images (a "
        "`datasets` Image column {bytes, path}, or binary) or image paths (strings); name the image "
        "column with columns: {image: <column>} (CLI: --column image=<column>)"
    )


@dataclass
class Table:
    """An opened parquet or Hub source; :meth:`rows` reads it as LLaVA-Med VQA records."""

    source: DataConfig
    label: str  # how messages name it
    dataset: Any  # datasets.Dataset, memory-mapped
    columns: dict[str, str]  # field -> the column holding it
    image_kind: str  # struct | bytes | path

    @property
    def identity(self) -> str:
        """What the source is (not its content): the cache key's ``source``."""
        s = self.source
        where = f"hf:{s.hf}@{s.revision or 'main'}" if s.hf else str(Path(s.path).resolve())
        return f"{where}#{s.split}" if s.hf or Path(s.path).is_dir() else where

    def content_sha256(self) -> str:
        """SHA-256 over the Arrow files ``datasets`` prepared for this split (changes with the data)."""
        import hashlib

        from qlora_med.data.cache import file_sha256

        files = [Path(f["filename"]) for f in self.dataset.cache_files]
        if not files:  # an in-memory dataset (datasets' IN_MEMORY_MAX_SIZE): its fingerprint is all there is
            return hashlib.sha256(self.dataset._fingerprint.encode()).hexdigest()
        return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()

    def _keep(self) -> pa.ChunkedArray | None:
        """Rows kept by the language filter (None: all)."""
        column = self.columns.get("language")
        if column is None or self.source.language is None:
            return None
        values = pc.cast(self.dataset.data.column(column), pa.string())
        return pc.fill_null(pc.equal(values, self.source.language), False)

    def log_summary(self) -> None:
        """One line per inference made: the language filter, answer types without a column."""
        keep = self._keep()
        total = len(self.dataset)
        if keep is not None:
            kept = pc.sum(keep).as_py() or 0
            logger.info(
                "%s: kept %d of %d rows whose %s is '%s' (data.language; null keeps all)",
                self.label,
                kept,
                total,
                self.columns["language"],
                self.source.language,
            )
        if "answer_type" not in self.columns:
            answers = pc.utf8_lower(
                pc.utf8_trim_whitespace(
                    pc.cast(self.dataset.data.column(self.columns["answer"]), pa.string())
                )
            )
            closed = pc.is_in(answers, pa.array(CLOSED_ANSWERS))
            if keep is not None:
                closed = pc.and_(closed, keep)
            n_closed = pc.sum(closed).as_py() or 0
            n_all = total if keep is None else pc.sum(keep).as_py() or 0
            logger.info(
                "%s: no answer_type column: inferred CLOSED for %d yes/no answers, OPEN for %d others "
                "(name a column with columns: {answer_type: <column>})",
                self.label,
                n_closed,
                n_all - n_closed,
            )

    def rows(self, images: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
        """(1-based row number, LLaVA-Med VQA record) for each kept row; ``images=False`` skips image bytes."""
        cols = self.columns
        keep = self._keep()
        names = [c for f, c in cols.items() if f != "image" or images]
        start = 0
        for batch in self.dataset.with_format("arrow").select_columns(sorted(set(names))).iter(BATCH_ROWS):
            n = batch.num_rows
            values = {f: batch.column(c).to_pylist() for f, c in cols.items() if f != "image"}
            data, paths = self._images(batch, n) if images else ([None] * n, [None] * n)
            kept = keep.slice(start, n).to_pylist() if keep is not None else [True] * n
            for i in range(n):
                if kept[i]:
                    yield (
                        start + i + 1,
                        self._record(start + i, {f: v[i] for f, v in values.items()}, data[i], paths[i]),
                    )
            start += n

    def _images(self, batch: pa.Table, n: int) -> tuple[list, list]:
        column = batch.column(self.columns["image"])
        if self.image_kind == "struct":
            data = pc.struct_field(column, "bytes").to_pylist()
            has_path = column.type.get_field_index("path") >= 0
            return data, pc.struct_field(column, "path").to_pylist() if has_path else [None] * n
        if self.image_kind == "bytes":
            return column.to_pylist(), [None] * n
        return [None] * n, column.to_pylist()

    def _record(
        self, index: int, row: dict[str, Any], data: bytes | None, path: str | None
    ) -> dict[str, Any]:
        question, answer = row["question"], row["answer"]
        if isinstance(question, str) and IMAGE_TOKEN not in question:
            question = f"{question.strip()}\n{IMAGE_TOKEN}"
        answer = None if answer is None else str(answer).strip()
        if "answer_type" in row and row["answer_type"] is not None:
            answer_type = str(row["answer_type"]).strip().upper()
        else:
            answer_type = infer_answer_type(answer) if answer is not None else "OPEN"
        if data is not None:
            image = PurePath(path).name if path else f"row-{index}"
        else:
            image = path
        record = {
            "id": row["id"] if row.get("id") is not None else index,
            "image": image,
            "image_bytes": data,
            "answer_type": answer_type,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        }
        if row.get("question_type") is not None:
            record["question_type"] = str(row["question_type"])
        return record


def open_table(source: DataConfig) -> Table:
    """Open a parquet or Hub source and find its columns (a missing required one raises ``DataError``)."""
    label = source_label(source)
    if source.path is not None and Path(source.path).is_dir():
        label = f"{label} (split {source.split})"
    dataset = _load(source, label)
    names = list(dataset.column_names)
    columns, problems = {}, []
    for field, candidates in TABLE_COLUMNS.items():
        wanted = source.columns.get(field)
        if wanted is not None:
            if wanted in names:
                columns[field] = wanted
            else:
                problems.append(f"columns.{field} names '{wanted}'")
            continue
        found = next((c for c in candidates if c in names), None)
        if found is not None:
            columns[field] = found
    missing = [f for f in REQUIRED_COLUMNS if f not in columns and f not in source.columns]
    if problems or missing:
        what = "; ".join(
            [
                *(f"no {f} column (looked for {', '.join(TABLE_COLUMNS[f])})" for f in missing),
                *(f"{p}, which it does not have" for p in problems),
            ]
        )
        example = ", ".join(f"{f}: <column>" for f in missing) or "image: <column>"
        raise DataError(
            f"{label}: {what}; columns found: {names}. Name them with columns: {{{example}}} "
            "in the recipe's data source (CLI: --column FIELD=COLUMN)"
        )
    kind = _image_kind(label, columns["image"], dataset.data.schema.field(columns["image"]).type)
    table = Table(source, label, dataset, columns, kind)
    logger.info("%s: %d rows, columns %s", label, len(dataset), columns)
    table.log_summary()
    return table
