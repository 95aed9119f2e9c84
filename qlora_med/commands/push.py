"""``qlora-med push``: upload a merged or exported model folder to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora_med.artifacts.card import CardOptions
from qlora_med.artifacts.hub import PushOptions, PushPlan, push
from qlora_med.commands._options import human_size

NAME = "push"
HELP = "push a merged/exported model folder (with its model card) to the Hugging Face Hub in one commit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="a folder written by `qlora-med merge` or `qlora-med export`")
    parser.add_argument("--repo-id", required=True, help="USER/NAME or ORG/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="push to this branch (created from main if missing)")
    parser.add_argument("--commit-message", help="commit message (default: 'Upload FOLDER with qlora-med')")
    parser.add_argument("--dry-run", action="store_true", help="print the files, sizes and the card; no network")
    parser.add_argument("--eval-json", type=Path, action="append", default=[],
                        help="evaluation result (`eval score --json` / `eval chat --json` output) for the card; "
                        "repeatable; eval/*.json next to the model is picked up too")
    parser.add_argument("--base-model", action="append", default=[],
                        help="Hub id of a base model for the card metadata (repeatable)")
    parser.add_argument("--dataset", action="append", default=[], help="Hub id of a training dataset (repeatable)")
    parser.add_argument("--license", default="other", help="license id for the card metadata (default: other)")
    parser.add_argument("--license-name", help="with --license other: its short name (default: "
                        "microsoft-research-license, LLaVA-Med's terms)")
    parser.add_argument("--license-link", help="with --license other: URL or repo path of its text (default: "
                        "LLaVA-Med's LICENSE)")
    parser.add_argument("--retries", type=int, default=3, help="retries of each Hub call on transient errors")
    parser.epilog = "The token is read from HF_TOKEN or the `hf auth login` store; HF_ENDPOINT selects the Hub."


def _print_plan(plan: PushPlan, repo_id: str, dry_run: bool) -> None:
    width = max(len(name) for name, _ in plan.files)
    lines = [f"{'would upload' if dry_run else 'uploaded'} to {repo_id}:"]
    lines += [f"  {name:<{width}}  {human_size(size):>10}" for name, size in plan.files]
    lines.append(f"  {'total':<{width}}  {human_size(plan.total_bytes):>10} ({len(plan.files)} files)")
    sys.stdout.write("\n".join(lines) + "\n")


def main(args: argparse.Namespace) -> int:
    options = PushOptions(
        repo_id=args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message,
        dry_run=args.dry_run, retries=args.retries,
        card=CardOptions(base_models=args.base_model, datasets=args.dataset, license=args.license,
                         license_name=args.license_name, license_link=args.license_link, eval_files=args.eval_json),
    )
    result = push(args.folder, options)
    if isinstance(result, PushPlan):
        _print_plan(result, args.repo_id, dry_run=True)
        sys.stdout.write("\n--- README.md (model card) ---\n" + result.card + "\n")
        return 0
    _print_plan(result.plan, args.repo_id, dry_run=False)
    sys.stdout.write(f"commit: {result.commit_url}\nrevision: {result.revision}\n")
    return 0
