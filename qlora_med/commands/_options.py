"""What several commands share: argparse options, choice lists and output formatting (no library code).

Command modules import only this and torch-free modules at the top, so ``qlora-med --help`` stays fast; the choice
lists are checked against the library's tables in tests/unit/commands/test_options.py.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

DTYPE_CHOICES = ("bf16", "fp16", "fp32")  # qlora_med.model.load.DTYPES
EXPORT_FORMATS = ("peft", "llava-med", "gguf", "hf")  # qlora_med.artifacts.export.FORMATS


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Decoding options shared by ``chat`` and ``serve``."""
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling (only with --temperature > 0)"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", *DTYPE_CHOICES), help="compute dtype"
    )


COLUMN_FIELDS = ("image", "question", "answer", "answer_type", "id", "question_type", "language")  # sources.TABLE_COLUMNS
DATA_HELP = ("a LLaVA-Med JSON/JSONL file; or parquet (a .parquet file, a glob in quotes, or a folder of them); "
             "or hf:ORG/NAME[@REVISION], a Hub dataset (HF_HUB_OFFLINE=1: the cache only)")


def add_source_arguments(parser: argparse.ArgumentParser, split: str) -> None:
    """``--split``, ``--revision`` and ``--column`` for a parquet or Hub ``--data``/``FILE`` argument."""
    parser.add_argument("--split", default=split,
                        help=f"split of a Hub dataset or parquet folder (default {split})")
    parser.add_argument("--revision", default=None, help="Hub dataset branch, tag or commit (default: main)")
    parser.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                        help=f"parquet/Hub column of FIELD ({', '.join(COLUMN_FIELDS)}) when not the default, "
                             "e.g. --column image=img_name; repeatable")


def summarise(results: list[dict], output_dir: str) -> None:
    for info in results:
        logger.info("%-10s loss %s -> %s  steps %s  (%s s)", info["stage"], _fmt(info["loss_first"]),
                    _fmt(info["loss_last"]), info["steps"], info["wall_time_s"])
    logger.info("artefacts: %s/<stage>/final (adapter, projector, processor, stage.json, loss.png)", output_dir)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
