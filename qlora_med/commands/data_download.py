"""``qlora-med data download``: fetch LLaVA-Med figures from PubMed Central open-access packages."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qlora_med.data.download import DownloadConfig, download_images, read_url_list

NAME = "data download"
HELP = "download LLaVA-Med figures (llava_med_image_urls.jsonl) from PMC open-access packages"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--urls", required=True, type=Path, help="llava_med_image_urls.jsonl")
    parser.add_argument(
        "--out", required=True, type=Path, help="image folder; figures saved as <pair_id>.jpg"
    )
    parser.add_argument("--workers", type=int, default=4, help="packages downloaded in parallel (default 4)")
    parser.add_argument("--retries", type=int, default=3, help="retries on timeouts, connection errors, 5xx")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per network operation")
    parser.add_argument(
        "--backoff", type=float, default=2.0, help="first retry delay in s, doubled each retry"
    )
    parser.add_argument(
        "--failures", type=Path, default=None, help="failure report, JSONL (default <out>/failures.jsonl)"
    )
    parser.add_argument(
        "--skip-bad-lines", action="store_true", help="skip malformed lines instead of failing"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N records (for a trial run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    cfg = DownloadConfig(
        workers=args.workers,
        retries=args.retries,
        timeout=args.timeout,
        backoff=args.backoff,
        progress=False if args.no_progress else None,
    )
    requests, bad_lines = read_url_list(args.urls, skip_bad_lines=args.skip_bad_lines)
    if args.limit is not None:
        requests = requests[: args.limit]
    failures_path = args.failures or args.out / "failures.jsonl"
    summary = download_images(requests, args.out, cfg, failures_path=failures_path)
    summary.bad_lines = bad_lines
    logger.info("%s", summary.line())
    if summary.failed:
        logger.warning(
            "%d figures failed; reasons in %s; rerun the same command to retry", summary.failed, failures_path
        )
    return 1 if summary.failed else 0
