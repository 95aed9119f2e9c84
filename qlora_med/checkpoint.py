"""Atomic writes and the trainable state of a stage (adapter + projector), never the frozen base."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "projector.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
COMPLETE = "COMPLETE"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; published files should be world-readable
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``final`` only if the block succeeds."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def projector_module(model: torch.nn.Module) -> torch.nn.Module:
    """The LLaVA projector inside a (possibly PEFT-wrapped) model."""
    for name, module in model.named_modules():
        if name.endswith("multi_modal_projector"):
            return module
    raise ValueError("model has no multi_modal_projector")


def save_trainable(model: torch.nn.Module, out: Path) -> None:
    """Write the LoRA adapter (PEFT format, if any) and the projector weights to ``out``."""
    from peft import PeftModel

    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(out)
    state = {k: v.detach().contiguous().cpu() for k, v in projector_module(model).state_dict().items()}
    save_file(state, out / PROJECTOR_FILE, metadata={"format": "pt"})


def load_projector(model: torch.nn.Module, src: Path) -> None:
    """Load projector weights saved by :func:`save_trainable` (dtype of the live module kept)."""
    projector_module(model).load_state_dict(load_file(src / PROJECTOR_FILE), strict=True)


def load_trainable(model: torch.nn.Module, src: Path) -> None:
    """Restore adapter and projector weights in place (used when resuming a checkpoint)."""
    from peft import PeftModel, set_peft_model_state_dict

    if isinstance(model, PeftModel):
        adapter = src / ADAPTER_FILE
        if not adapter.is_file():
            raise FileNotFoundError(f"{src}: checkpoint has no {ADAPTER_FILE}")
        result = set_peft_model_state_dict(model, load_file(adapter))
        if result.unexpected_keys:
            raise ValueError(f"{src}: unexpected adapter keys {result.unexpected_keys[:5]}")
    load_projector(model, src)


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
