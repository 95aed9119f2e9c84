"""``qlora-med eval vqa``: answer a VQA / qa50 test file with a trained model (LLaVA-Med answer JSONL)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qlora_med.commands._options import DATA_HELP, add_source_arguments
from qlora_med.errors import QloraMedError

NAME = "eval vqa"
HELP = "generate answers for a LLaVA-Med VQA test file or qa50 questions (resumable prediction JSONL)"

logger = logging.getLogger(__name__)

DECODING_CHOICES = ("greedy", "llava-med")  # qlora_med.eval.generate.DECODING_PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="run dir, stage final/, checkpoint-N/ or merged model")
    parser.add_argument(
        "--data",
        required=True,
        help="VQA test set: " + DATA_HELP + "; JSON: id, image, conversations (or qa50: question_id, image, text)",
    )
    parser.add_argument(
        "--image-folder",
        type=Path,
        default=None,
        help="folder the 'image' paths are relative to (JSON: required; parquet/Hub: only for paths, not embedded images)",
    )
    parser.add_argument("--allow-outside-images", action="store_true",
                        help="accept image paths that resolve outside --image-folder (absolute paths, .., symlinks)")
    add_source_arguments(parser, "test")
    parser.add_argument(
        "--out", type=Path, required=True, help="prediction JSONL; re-running skips answered ids"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="questions per generate() call (left-padded)"
    )
    parser.add_argument(
        "--decoding",
        choices=DECODING_CHOICES,
        help="named decoding settings: greedy (64 new tokens), or llava-med: LLaVA-Med's llava/eval/model_vqa.py "
        "(temperature 0.2, top_p 1, top_k 50, 1024 new tokens; it answers one question at a time: --batch-size 1); "
        "not with --temperature/--top-p",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help="answer length limit in tokens (default 64, or the --decoding preset's)"
    )
    parser.add_argument("--temperature", type=float, help="0 = greedy (default); > 0 samples")
    parser.add_argument(
        "--top-p", type=float, help="nucleus sampling (only with --temperature > 0; default 1)"
    )
    parser.add_argument(
        "--closed-suffix",
        metavar="TEXT",
        help="text appended (after a space) to CLOSED questions only (answer_type CLOSED), e.g. "
        "'Please answer yes or no.', or 'yes-no' for exactly that; recorded in the prediction file",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--limit", type=int, help="answer only the first N questions of the file")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="compute dtype (auto: bf16 on GPUs, fp32 on CPUs without native bf16)",
    )
    parser.add_argument(
        "--model-id", help="model_id written to each answer (default: the model folder's name)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from transformers import set_seed

    from qlora_med.artifacts.load import trained_folder
    from qlora_med.data.tables import cli_source
    from qlora_med.eval.generate import (
        Generator,
        answer_settings,
        check_resumable,
        closed_suffix_text,
        decoding_sampling,
        load_questions,
        load_table_questions,
        run_vqa,
    )

    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise QloraMedError("--batch-size and --limit must be >= 1")
    try:
        decoding, sampling = decoding_sampling(args.decoding, args.max_new_tokens, args.temperature, args.top_p)
    except ValueError as err:
        raise QloraMedError(str(err)) from None
    source = cli_source(args.data, args.image_folder, args.split, args.revision, args.column)
    if source is None and args.image_folder is None:
        raise QloraMedError(f"{args.data}: a JSON/JSONL test file needs --image-folder")
    if source is not None:
        source.allow_outside_images = args.allow_outside_images
        questions = load_table_questions(source)[: args.limit]
    else:
        questions = load_questions(Path(args.data), args.image_folder, args.allow_outside_images)[: args.limit]
    suffix = closed_suffix_text(args.closed_suffix)
    model_id = args.model_id or Path(args.model).resolve().name
    folder = str(trained_folder(args.model).resolve())
    check_resumable(args.out, model_id, answer_settings(folder, sampling, decoding, suffix))  # before loading
    set_seed(args.seed)
    generator = Generator.load(args.model, args.dtype)
    n = run_vqa(generator, questions, args.out, model_id, sampling, args.batch_size, not args.no_progress,
                suffix, decoding)
    logger.info(
        "answered %d question(s) (%d in the file%s); predictions in %s",
        n,
        len(questions),
        f", limit {args.limit}" if args.limit else "",
        args.out,
    )
    return 0
