"""What is written about a finished stage: the ``stage.json`` record, the loss plot, versions and hardware.

``stage.json`` describes what was trained (the live model's adapter settings, the batch actually used,
the losses logged), not only what the recipe asked for; the model card and ``qlora-med merge`` read it.
"""

from __future__ import annotations

import platform
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qlora_med.config.schema import RecipeConfig, StageConfig
from qlora_med.train.trainable import lora_settings

if TYPE_CHECKING:
    from qlora_med.data.build import BuildStats
    from qlora_med.patches.select import KernelSetup
    from qlora_med.train.oom import BatchPlan
    from qlora_med.train.trainer import StageTrainer


def trained_lora(model: torch.nn.Module) -> dict[str, Any] | None:
    """r, alpha, dropout and target_modules of the adapter the model trains or carries; None without one."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return None
    return lora_settings(model.peft_config[model.active_adapter].to_dict())


def stage_record(recipe: RecipeConfig, stage: StageConfig, *, trainer: StageTrainer, model: torch.nn.Module,
                 base_dir: Path, previous: Path | None, compute_dtype: torch.dtype, plan: BatchPlan, samples: int,
                 stats: BuildStats, kernels: KernelSetup, wall_time_s: float, image_side: int | None = None,
                 checkpointing: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``stage.json`` of a trained stage, from the trainer's state, the batch plan used and the model;
    ``image_side`` is the square side images were resized to (None: the processor's own size)."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "stage": stage.name, "kind": stage.kind, "base_model": str(base_dir),
        "previous_stage": str(previous) if previous else None, "template": stage.template,
        "quantization": recipe.model.quantization, "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "image_aspect": recipe.model.image_aspect, "image_size": image_side,
        "sampling": trainer.args.train_sampling_strategy, "train": asdict(stage.train),
        "lora": trained_lora(model),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "steps": trainer.state.global_step, "samples": samples, "truncated": stats.truncated,
        "skipped_images": trainer.data_collator.skipped, "micro_batch": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation, "oom_halvings": plan.halvings,
        "world_size": trainer.accelerator.num_processes,
        "global_batch": plan.micro_batch * plan.accumulation * trainer.accelerator.num_processes, "wall_time_s": round(wall_time_s, 1),
        "hardware": _hardware(), "versions": _versions(), "kernels": kernels.summary(),
        "gradient_checkpointing": checkpointing or {"enabled": bool(stage.gradient_checkpointing),
                                                    "setting": stage.gradient_checkpointing},
    }


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
