"""Push a merged or exported model folder to the Hugging Face Hub in one commit.

``huggingface_hub.HfApi``: ``create_repo(exist_ok=True)``, ``create_branch`` for a revision, then
``upload_folder`` (all files, one commit). Transient failures (connection dropped or refused,
timeouts, HTTP 429/5xx) are retried with exponential back-off, then reported. The token comes from
``HF_TOKEN`` or ``hf auth login`` (``huggingface_hub.get_token``); it is never logged, printed or
written to our files. ``HF_ENDPOINT`` selects another Hub (mirrors, tests).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from qlora_med.artifacts.card import CARD_FILE, HUB_ID, CardOptions, build_card
from qlora_med.artifacts.run_dir import META_FILE
from qlora_med.errors import QloraMedError
from qlora_med.io import atomic_write_text

logger = logging.getLogger(__name__)
T = TypeVar("T")

IGNORE = [".*", "**/.*", "*.tmp", "**/__pycache__/**"]


class HubError(QloraMedError):
    """The Hub refused the push or could not be reached."""


@dataclass
class PushOptions:
    """Where and how to push; card metadata the run cannot know."""

    repo_id: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    dry_run: bool = False
    retries: int = 3
    backoff_s: float = 2.0
    card: CardOptions = field(default_factory=CardOptions)


@dataclass
class PushPlan:
    """What would be uploaded: (path, bytes) and the model card text."""

    files: list[tuple[str, int]]
    card: str

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


@dataclass
class PushResult:
    """Where a push landed: repo, commit, branch, and what was uploaded."""

    repo_url: str
    commit_url: str
    revision: str
    plan: PushPlan


def plan_push(folder: Path, options: PushOptions) -> PushPlan:
    """List the files to upload and the model card (rebuilt for the repo id when the run is available)."""
    if not HUB_ID.match(options.repo_id):
        raise QloraMedError(f"--repo-id '{options.repo_id}': expected USER/NAME or ORG/NAME")
    if not folder.is_dir() or not any(folder.iterdir()):
        raise QloraMedError(f"{folder}: not a model directory (run `qlora-med merge` or `qlora-med export` first)")
    meta_file = folder / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    source = Path(meta["source"]) if meta.get("source") else None
    if source is not None and source.is_dir():
        kind = meta.get("format") or "merged"
        card = build_card(source, kind, folder, options.card, options.repo_id)
    elif options.card.eval_files:
        raise QloraMedError(f"{folder}: cannot rebuild the card with --eval-json: the training run "
                            f"({meta.get('source', 'unknown')}) is not available here")
    elif (folder / CARD_FILE).is_file():
        card = (folder / CARD_FILE).read_text()
    else:
        raise QloraMedError(f"{folder}: no {CARD_FILE} model card; push a folder written by merge or export")
    files = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}
    files[CARD_FILE] = len(card.encode())
    return PushPlan(sorted(files.items()), card)


def _is_transient(err: Exception) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError) and err.response is not None:
        return err.response.status_code == 429 or err.response.status_code >= 500
    return isinstance(err, (httpx2.TransportError, ConnectionError, TimeoutError))


def _call(what: str, fn: Callable[[], T], options: PushOptions, endpoint: str) -> T:
    """Run one Hub call, retrying transient errors; map failures to clear :class:`HubError` messages."""
    from huggingface_hub.errors import HfHubHTTPError

    delay = options.backoff_s
    for attempt in range(options.retries + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below
            status = err.response.status_code if isinstance(err, HfHubHTTPError) and err.response is not None else None
            if status in (401, 403):
                raise HubError(f"{what}: the Hub at {endpoint} refused the token (HTTP {status}): check HF_TOKEN or "
                               "`hf auth login`, and that the token has write access to the namespace") from err
            if not _is_transient(err):
                raise HubError(f"{what} failed: {type(err).__name__}: {err}") from err
            if attempt == options.retries:
                raise HubError(f"{what}: the Hub at {endpoint} failed {options.retries + 1} times "
                               f"(last error: {type(err).__name__}: {err}); nothing was committed by this step, "
                               "run the same command again") from err
            logger.warning("%s: %s: %s; retrying in %.1f s (%d/%d)", what, type(err).__name__, err, delay,
                           attempt + 1, options.retries)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def push(folder: str | Path, options: PushOptions, token: str | None = None) -> PushPlan | PushResult:
    """Create the repo (if needed) and upload ``folder`` in one commit; ``dry_run`` only plans."""
    from huggingface_hub import HfApi, constants, get_token

    folder = Path(folder)
    plan = plan_push(folder, options)
    if options.dry_run:
        return plan
    card_file = folder / CARD_FILE
    if not card_file.is_file() or card_file.read_text() != plan.card:
        atomic_write_text(card_file, plan.card)
        os.chmod(card_file, 0o644)
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (write access needed)")
    api = HfApi(token=token)
    endpoint = constants.ENDPOINT
    repo_url = _call("create repo", lambda: api.create_repo(options.repo_id, private=options.private,
                                                           repo_type="model", exist_ok=True), options, endpoint)
    logger.info("repo %s ready", repo_url)
    if options.revision:
        _call(f"create branch {options.revision}", lambda: api.create_branch(
            options.repo_id, branch=options.revision, repo_type="model", exist_ok=True), options, endpoint)
    message = options.commit_message or f"Upload {folder.name} with qlora-med"
    commit = _call("upload", lambda: api.upload_folder(
        repo_id=options.repo_id, folder_path=folder, repo_type="model", revision=options.revision,
        commit_message=message, ignore_patterns=IGNORE), options, endpoint)
    logger.info("pushed %d files (%.1f MB) to %s in one commit: %s", len(plan.files), plan.total_bytes / 1e6,
                options.repo_id, commit.commit_url)
    return PushResult(str(repo_url), commit.commit_url, options.revision or "main", plan)
