"""Loss curves as PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


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
