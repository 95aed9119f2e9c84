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
    add_source_arguments(parser, "test")
    parser.add_argument(
        "--out", type=Path, required=True, help="prediction JSONL; re-running skips answered ids"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="questions per generate() call (left-padded)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling (only with --temperature > 0)"
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

    from qlora_med.data.tables import cli_source
    from qlora_med.eval.generate import Generator, Sampling, load_questions, load_table_questions, run_vqa

    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise QloraMedError("--batch-size and --limit must be >= 1")
    try:
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p)
    except ValueError as err:
        raise QloraMedError(str(err)) from None
    source = cli_source(args.data, args.image_folder, args.split, args.revision, args.column)
    if source is None and args.image_folder is None:
        raise QloraMedError(f"{args.data}: a JSON/JSONL test file needs --image-folder")
    if source is not None:
        questions = load_table_questions(source)[: args.limit]
    else:
        questions = load_questions(Path(args.data), args.image_folder)[: args.limit]
    set_seed(args.seed)
    generator = Generator.load(args.model, args.dtype)
    model_id = args.model_id or Path(args.model).resolve().name
    n = run_vqa(generator, questions, args.out, model_id, sampling, args.batch_size, not args.no_progress)
    logger.info(
        "answered %d question(s) (%d in the file%s); predictions in %s",
        n,
        len(questions),
        f", limit {args.limit}" if args.limit else "",
        args.out,
    )
    return 0
