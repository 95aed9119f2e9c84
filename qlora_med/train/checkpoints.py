"""A stage's checkpoints: mark complete, rotate, find the one to resume from, remove interrupted ones.

Layout, inside the stage's output dir (``<output_dir>/<stage>/``)::

    checkpoint-<step>/   adapter (PEFT files, if any) + projector.safetensors, optimizer, scheduler,
                         RNG and trainer state (written by ``StageTrainer``)
        COMPLETE         written last: a checkpoint without it was interrupted mid-write
    final/               the finished stage (see ``qlora_med.train.runner``), never touched here

Rotation keeps the newest ``save_total_limit`` complete checkpoints; incomplete ones are never resumed from.
"""

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
    """The newest complete checkpoint (the one to resume from), or None; deletes nothing."""
    complete = [path for _step, path, ok in list_checkpoints(stage_dir) if ok]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(stage_dir: Path) -> list[Path]:
    """Delete checkpoints interrupted while being written (no ``COMPLETE``), with a log line each; returns them."""
    removed = [path for _step, path, ok in list_checkpoints(stage_dir) if not ok]
    for path in removed:
        logger.warning("removing incomplete checkpoint %s (interrupted while being written)", path)
        shutil.rmtree(path, ignore_errors=True)
    return removed


def rotate_checkpoints(stage_dir: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond ``keep``."""
    complete = [path for _s, path, ok in list_checkpoints(stage_dir) if ok]
    for path in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
