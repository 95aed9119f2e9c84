"""A stage's checkpoints: mark complete, rotate, find the one to resume from, remove interrupted ones.

Layout, inside the stage's output dir (``<output_dir>/<stage>/``)::

    checkpoint-<step>/   adapter (PEFT files, if any) + projector.safetensors, optimizer, scheduler,
                         RNG and trainer state (written by ``StageTrainer``)
        COMPLETE         written last: the size and sha256 of every other file (a checkpoint without it
                         was interrupted mid-write)
    final/               the finished stage (see ``qlora_med.train.runner``), never touched here

Before a resume every candidate is verified against its ``COMPLETE`` manifest (files present, sizes and
hashes equal, safetensors readable, optimizer and trainer state there): a bad one is reported by name and
the next older good one is used. Rotation keeps the newest ``save_total_limit`` complete checkpoints;
incomplete ones are never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from qlora_med.io import atomic_write_text

logger = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


LEGACY_MARKER = "ok\n"  # COMPLETE before manifests (qlora-med <= 0.1.0 sessions)
REQUIRED = ("projector.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt")  # what resume reads


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _legacy_problem(checkpoint: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    for name in REQUIRED:
        if not (checkpoint / name).is_file():
            return f"it has no {name}"
    for path in sorted(checkpoint.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except (SafetensorError, OSError) as err:
            return f"{path.name} is unreadable ({err})"
    return None


def mark_complete(checkpoint: Path) -> None:
    """Write ``COMPLETE``: the manifest (size, sha256) of every file in the checkpoint, written last."""
    files = {str(p.relative_to(checkpoint)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != COMPLETE}
    atomic_write_text(checkpoint / COMPLETE, json.dumps({"files": files}, indent=1) + "\n")


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint marked complete cannot be resumed from (None: it can)."""
    try:
        marker = (checkpoint / COMPLETE).read_text()
        files = None if marker == LEGACY_MARKER else json.loads(marker)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {COMPLETE} manifest is unreadable (damaged)"
    if files is None:  # written before manifests: the files must be there and the safetensors readable
        return _legacy_problem(checkpoint)
    for name in REQUIRED:
        if name not in files:
            return f"it has no {name}"
    for name, meta in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{name} is {path.stat().st_size} bytes, {meta['size']} were written (truncated or changed)"
        if _sha256(path) != meta["sha256"]:
            return f"{name} changed since it was written (sha256 differs)"
    return None


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
    """The newest complete checkpoint that verifies (the one to resume from), or None; deletes nothing.
    Each bad one on the way is logged with what is wrong."""
    complete = [path for _step, path, ok in list_checkpoints(stage_dir) if ok]
    for path in reversed(complete):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("checkpoint %s is marked complete but %s: not resuming from it", path, problem)
    return None


def set_aside_bad_checkpoints(stage_dir: Path) -> list[Path]:
    """Rename complete-marked checkpoints that fail verification to ``checkpoint-N.bad`` (kept for inspection,
    never overwritten by a new save at the same step), with a log line each; returns the new paths."""
    moved = []
    for _step, path, ok in list_checkpoints(stage_dir):
        problem = checkpoint_problem(path) if ok else None
        if problem is not None:
            target = path.with_name(path.name + ".bad")
            shutil.rmtree(target, ignore_errors=True)
            path.rename(target)
            logger.warning("checkpoint %s is marked complete but %s: moved to %s; resuming from the newest good "
                           "one", path, problem, target.name)
            moved.append(target)
    return moved


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
