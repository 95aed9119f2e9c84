"""Run curriculum stages: build model and data, hand them to the trainer, save ``final/``.

A stage whose ``final/`` exists is skipped; an unfinished stage resumes from its last complete
checkpoint. Each stage starts from the previous stage's ``final/`` (projector, and adapters).
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    import peft
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__}


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}"
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def plot_loss(log_history: list[dict], path: Path, title: str) -> None:
    """Plot training loss against step; writes nothing when no loss was logged."""
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    if not points:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(*zip(*points, strict=True), marker="o", markersize=3)
    ax.set(xlabel="optimizer step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
