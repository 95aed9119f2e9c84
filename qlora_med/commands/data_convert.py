"""``qlora-med data convert``: VQA-RAD / SLAKE / PathVQA release → LLaVA-Med VQA JSON + images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora_med.data.convert import DATASETS, convert

NAME = "data convert"
HELP = "convert a public VQA-RAD, SLAKE or PathVQA release to LLaVA-Med VQA JSON (train/val/test + images)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=DATASETS, help="which release layout SRC has")
    parser.add_argument(
        "src",
        type=Path,
        metavar="SRC",
        help="release folder (VQA-RAD: folder or its JSON file; SLAKE: Slake1.0/; PathVQA: pvqa/)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--link",
        action="store_true",
        help="hard-link images instead of copying them (copied where the file systems differ)",
    )


def main(args: argparse.Namespace) -> int:
    result = convert(args.dataset, args.src, args.out, link=args.link)
    lines = [
        f"{result.dataset} -> {result.out_dir}",
        f"{'split':<6} {'questions':>9} {'open':>6} {'closed':>6} {'images':>6}",
    ]
    for split, s in result.splits.items():
        lines.append(f"{split:<6} {s.questions:>9} {s.open:>6} {s.closed:>6} {s.images:>6}  {s.file}")
    if result.skipped:
        lines.append(f"left out {result.skipped} non-English questions")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
