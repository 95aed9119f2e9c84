"""``qlora-med data preview``: the first records of a data file as a recipe stage would train on them."""

from __future__ import annotations

import argparse
import sys

NAME = "data preview"
HELP = (
    "show records rendered and tokenized as a recipe stage trains on them: trained tokens highlighted, counts"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", metavar="FILE", help="a LLaVA-Med JSON/JSONL file (alignment, instruct or VQA)"
    )
    parser.add_argument(
        "--recipe",
        required=True,
        metavar="R",
        help="recipe whose model and stage to use (key=value overrides may follow)",
    )
    parser.add_argument(
        "--stage", default=None, metavar="S", help="stage name (default: the recipe's first stage)"
    )
    parser.add_argument("--limit", type=int, default=3, metavar="N", help="records shown (default 3)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: template, tokenizer mode and each record's id, input_ids, labels",
    )
    parser.set_defaults(overrides=[])  # recipe key=value overrides may follow the options


def main(args: argparse.Namespace) -> int:
    from qlora_med.data.preview import format_json, format_text, preview_file
    from qlora_med.errors import QloraMedError

    if args.limit < 1:
        raise QloraMedError("--limit must be at least 1")
    preview, tokenizer = preview_file(args.file, args.recipe, args.stage, args.limit, args.overrides)
    if args.json:
        sys.stdout.write(format_json(preview) + "\n")
    else:
        sys.stdout.write(format_text(preview, tokenizer, colour=sys.stdout.isatty()) + "\n")
    return 0
