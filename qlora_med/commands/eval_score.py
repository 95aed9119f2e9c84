"""``qlora-med eval score``: the paper's VQA metrics for a prediction file against a test file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from qlora_med.commands._options import DATA_HELP, add_source_arguments
from qlora_med.eval.metrics import (
    PAPER_KEYS,
    STRICT_KEYS,
    GroupScores,
    VqaReport,
    load_vqa_examples,
    score_vqa,
)

NAME = "eval score"
HELP = "score a VQA prediction JSONL against a LLaVA-Med VQA test file (paper metrics + strict block)"

# Breakdown columns: (header, block, key).
_COLUMNS = (
    ("recall", "paper", "recall"),
    ("open acc", "paper", "open accuracy"),
    ("yes/no acc", "paper", "yes/no accuracy"),
    ("strict closed", "strict", "closed accuracy"),
    ("strict EM", "strict", "open exact match"),
    ("strict F1", "strict", "open f1"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="VQA test set: " + DATA_HELP)
    add_source_arguments(parser, "test")
    parser.add_argument("--pred", type=Path, required=True, help="prediction JSONL (question_id, text, ...)")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _breakdown(title: str, groups: dict[str, GroupScores]) -> list[str]:
    width = max([len(title)] + [len(name) for name in groups])
    head = f"{title:<{width}} {'n':>5} {'open':>5} {'closed':>6} " + " ".join(
        f"{h:>13}" for h, _, _ in _COLUMNS
    )
    lines = [head, "-" * len(head)]
    for name, g in groups.items():
        cells = " ".join(f"{_fmt(getattr(g, block)[key]):>13}" for _, block, key in _COLUMNS)
        c = g.counts
        lines.append(f"{name:<{width}} {c['total']:>5} {c['open']:>5} {c['closed']:>6} {cells}")
    return lines


def render_table(report: VqaReport) -> str:
    """Human-readable report: paper block, strict block, counts, breakdowns."""
    o = report.overall
    lines = ["Paper metrics (LLaVA-Med run_eval_batch.py, x100)"]
    lines += [f"  {key:<18} {_fmt(o.paper[key]):>7}" for key in PAPER_KEYS]
    lines += ["", "Strict metrics (x100)"]
    lines += [f"  {key:<18} {_fmt(o.strict[key]):>7}" for key in STRICT_KEYS]
    c = o.counts
    lines += ["", f"Questions: {c['total']} (open {c['open']}, closed {c['closed']})", ""]
    lines += _breakdown("answer_type", report.by_answer_type) + [""]
    lines += _breakdown("question_type", report.by_question_type)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from qlora_med.data.tables import cli_source

    source = cli_source(args.data, None, args.split, args.revision, args.column)
    report = score_vqa(load_vqa_examples(Path(args.data), args.pred, source))
    if args.json:
        payload = {"data": str(args.data), "pred": str(args.pred), **dataclasses.asdict(report)}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        sys.stdout.write(render_table(report) + "\n")
    return 0
