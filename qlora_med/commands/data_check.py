"""``qlora-med data check``: report everything wrong with a data file before training on it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora_med.prompts.templates import TEMPLATES

NAME = "data check"
HELP = "check a LLaVA-Med data file (any format): images, roles, <image>, duplicate ids, token lengths"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, metavar="FILE", help="JSON list or JSONL (alignment, instruct or VQA)")
    parser.add_argument("--image-folder", type=Path, required=True, metavar="DIR",
                        help="folder the records' `image` paths are relative to")
    parser.add_argument("--tokenizer", default=None, metavar="DIR_OR_MODEL",
                        help="tokenizer or LLaVA model dir (default: the Mistral-7B-Instruct-v0.2 tokenizer, offline)")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                        help="prompt template (default: the stage preset for the detected format)")
    parser.add_argument("--max-length", type=int, default=2048, metavar="N", help="token limit (default 2048)")
    parser.add_argument("--num-image-tokens", type=int, default=None, metavar="N",
                        help="image tokens per image (default: from the --tokenizer model dir, else 576)")
    parser.add_argument("--image-token", default="<image>", help="image placeholder (default <image>)")
    parser.add_argument("--histogram", type=Path, default=None, metavar="PNG", help="write a token-length histogram")
    parser.add_argument("--workers", type=int, default=None, help="processes opening images (default: all CPUs)")
    parser.add_argument("--list", type=int, default=10, metavar="N", help="unusable records listed (default 10)")


def main(args: argparse.Namespace) -> int:
    from qlora_med.data.check import check_file, load_tokenizer, plot_lengths

    tokenizer, n_image = load_tokenizer(args.tokenizer, args.image_token)
    report = check_file(
        args.file, args.image_folder, tokenizer, template=args.template, max_length=args.max_length,
        num_image_tokens=args.num_image_tokens or n_image, image_token=args.image_token,
        workers=args.workers, listed=args.list,
    )
    text = report.text()
    if args.histogram is not None:
        plot_lengths(report, args.histogram)
        text += f"\nhistogram: {args.histogram}"
    sys.stdout.write(text + "\n")
    return 0 if report.ok else 1
