"""``qlora-med import``: a checkpoint in LLaVA's original layout (LLaVA-Med v1.5, LLaVA 1.5) -> an HF LLaVA folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "import"
HELP = (
    "convert an original-layout LLaVA / LLaVA-Med v1.5 checkpoint into an HF LLaVA folder you can fine-tune"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="SRC",
        help="folder or Hub id (e.g. microsoft/llava-med-v1.5-mistral-7b) of an original-layout checkpoint",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output directory (HF LlavaForConditionalGeneration)"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle weights (pytorch_model*.bin, e.g. liuhaotian/llava-v1.5-7b) for a checkpoint "
        "or tower you trust; read with torch.load(weights_only=True)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def main(args: argparse.Namespace) -> int:
    from qlora_med.model.original import import_checkpoint
    from qlora_med.notices import NOTICE

    out = import_checkpoint(args.source, args.out, allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    sys.stdout.write(
        f"imported {args.source} -> {out}\n"
        f"  set model.name_or_path: {out} in a recipe (LlavaForConditionalGeneration.from_pretrained loads it)\n"
        f"  {NOTICE.replace('**', '')}\n"
    )
    return 0
