"""``qlora-med eval chat``: the paper's judged relative chat score on the qa50 questions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from qlora_med.eval.judge import JudgeConfig, JudgeError, load_items, run_judge, summarize

NAME = "eval chat"
HELP = "judge chat answers against the qa50 GPT-4 references with an OpenAI-compatible LLM (relative score)"
KEY_VARIABLES = ("QLORA_MED_JUDGE_KEY", "OPENAI_API_KEY")

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--answers", type=Path, required=True, help="our answers, JSONL (question_id, text)")
    parser.add_argument("--questions", type=Path, required=True, help="llava_med_eval_qa50_qa.jsonl")
    parser.add_argument(
        "--judge-url", required=True, help="OpenAI-compatible base URL (…/v1) or …/chat/completions"
    )
    parser.add_argument("--judge-model", required=True, help="model name sent to the judge")
    parser.add_argument(
        "--out", type=Path, help="score JSONL, appended to and resumed from (default: ANSWERS.scores.jsonl)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="judge requests in flight at most")
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="extra attempts per question (429/5xx, connection errors, unreadable replies)",
    )
    parser.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds (doubles)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.epilog = (
        "The API key is read from QLORA_MED_JUDGE_KEY or OPENAI_API_KEY (optional for local judges)."
    )


def main(args: argparse.Namespace) -> int:
    api_key = next((os.environ[v] for v in KEY_VARIABLES if os.environ.get(v)), None)
    if api_key is None:
        logger.info("no %s set: calling the judge without an API key", " / ".join(KEY_VARIABLES))
    cfg = JudgeConfig(
        url=args.judge_url,
        model=args.judge_model,
        api_key=api_key,
        concurrency=args.concurrency,
        retries=args.retries,
        backoff_s=args.backoff,
        timeout_s=args.timeout,
    )
    out = args.out or args.answers.with_name(f"{args.answers.stem}.scores.jsonl")
    items = load_items(args.answers, args.questions)
    records, failures = run_judge(cfg, items, out)
    summary = summarize(records)
    if args.json:
        payload = {
            "scores_file": str(out),
            "unscored": sorted(failures),
            "groups": {k: dataclasses.asdict(v) for k, v in summary.items()},
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        lines = [
            f"Judged by {cfg.model}; scores in {out}",
            f"{'group':<22} {'n':>4} {'reference':>9} {'ours':>6} {'relative':>8}",
        ]
        for name, g in summary.items():
            lines.append(
                f"{name:<22} {g.count:>4} {g.reference_score:>9.2f} {g.model_score:>6.2f} {g.relative:>8.2f}"
            )
        sys.stdout.write("\n".join(lines) + "\n")
    if failures:
        first = "; ".join(list(failures.values())[:3])
        raise JudgeError(
            f"{len(failures)} of {len(items)} questions unscored ({first}); "
            "run the same command again to retry them (scored questions are kept)"
        )
    return 0
