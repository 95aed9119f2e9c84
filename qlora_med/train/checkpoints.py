"""Atomic writes and the trainable state of a stage (adapter + projector), never the frozen base."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from qlora_med.io import atomic_write_text

logger = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(checkpoint: Path) -> None:
    atomic_write_text(checkpoint / COMPLETE, "ok\n")


def list_checkpoints(stage_dir: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every ``checkpoint-N`` folder, oldest first."""
    found = []
    if stage_dir.is_dir():
        for child in stage_dir.iterdir():
            match = _CHECKPOINT_RE.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child, (child / COMPLETE).is_file()))
    return sorted(found)


def last_complete_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (killed mid-write) are removed, with a log line."""
    best = None
    for _step, path, complete in list_checkpoints(stage_dir):
        if complete:
            best = path
        else:
            logger.warning("removing incomplete checkpoint %s (interrupted while being written)", path)
            shutil.rmtree(path, ignore_errors=True)
    return best


def rotate_checkpoints(stage_dir: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond ``keep``."""
    complete = [path for _s, path, ok in list_checkpoints(stage_dir) if ok]
    for path in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
