"""``qlora-med data check``: report everything wrong with a data file before training on it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora_med.commands._options import DATA_HELP, add_source_arguments
from qlora_med.prompts.templates import TEMPLATES

NAME = "data check"
HELP = "check a LLaVA-Med data file (any format) or a parquet/Hub VQA set: images, roles, <image>, ids, token lengths"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help=DATA_HELP + " (JSON: alignment, instruct or VQA)")
    parser.add_argument("--image-folder", type=Path, default=None, metavar="DIR",
                        help="folder the records' `image` paths are relative to (JSON: required; parquet/Hub: only "
                             "for an image column of paths)")
    add_source_arguments(parser, "train")
    parser.add_argument("--tokenizer", default=None, metavar="DIR_OR_MODEL",
                        help="model dir or Hub id whose tokenizer, image tokens and chat template to use (a VLM of "
                             "any family, or a plain LLM; default: the Mistral-7B-Instruct-v0.2 tokenizer, offline)")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                        help="prompt template (default: the stage preset for the detected format)")
    parser.add_argument("--max-length", type=int, default=2048, metavar="N", help="token limit (default 2048)")
    parser.add_argument("--num-image-tokens", type=int, default=None, metavar="N",
                        help="image tokens per image (default: the --tokenizer model's, else 576)")
    parser.add_argument("--image-token", default=None,
                        help="image placeholder (default: the --tokenizer model family's, else <image>)")
    parser.add_argument("--histogram", type=Path, default=None, metavar="PNG", help="write a token-length histogram")
    parser.add_argument("--workers", type=int, default=None, help="processes opening images (default: all CPUs)")
    parser.add_argument("--allow-outside-images", action="store_true",
                        help="accept image paths that lead out of the image folder (absolute, '..', symlinks "
                             "elsewhere); as data.allow_outside_images: true")
    parser.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                        help="images with more pixels are unusable (default 40000000, as data.max_image_pixels)")
    parser.add_argument("--list", type=int, default=10, metavar="N", help="unusable records listed (default 10)")


def main(args: argparse.Namespace) -> int:
    from qlora_med.config.sources import MAX_IMAGE_PIXELS, PIL_BOMB_PIXELS
    from qlora_med.data.check import check_file, check_table, plot_lengths
    from qlora_med.data.model_text import load_model_text
    from qlora_med.data.records import IMAGE_TOKEN
    from qlora_med.data.tables import cli_source
    from qlora_med.errors import QloraMedError

    source = cli_source(args.file, args.image_folder, args.split, args.revision, args.column)
    if source is None and args.image_folder is None:
        raise QloraMedError(f"{args.file}: a JSON/JSONL file needs --image-folder (the folder its `image` paths "
                            "are relative to)")
    pixels = MAX_IMAGE_PIXELS if args.max_image_pixels is None else args.max_image_pixels
    if not 0 < pixels <= PIL_BOMB_PIXELS:
        raise QloraMedError(f"--max-image-pixels must be from 1 to {PIL_BOMB_PIXELS} (PIL refuses larger images as "
                            f"decompression bombs), got {pixels}")
    model = load_model_text(args.tokenizer, args.image_token or IMAGE_TOKEN, template=args.template)
    options = {"template": args.template, "max_length": args.max_length,
               "image_token": args.image_token or model.image_token, "chat": model.chat,
               "num_image_tokens": args.num_image_tokens or model.image_tokens, "workers": args.workers,
               "listed": args.list}
    if source is not None:
        source.allow_outside_images, source.max_image_pixels = args.allow_outside_images, pixels
        report = check_table(source, model.tokenizer, **options)
    else:
        report = check_file(args.file, args.image_folder, model.tokenizer, **options,
                            allow_outside_images=args.allow_outside_images, max_image_pixels=pixels)
    text = report.text()
    if args.histogram is not None:
        plot_lengths(report, args.histogram)
        text += f"\nhistogram: {args.histogram}"
    sys.stdout.write(text + "\n")
    return 0 if report.ok else 1
