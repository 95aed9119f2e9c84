"""``gradient_checkpointing: auto``: the memory planner decides, for this launch's device and micro-batch.

Checkpointing saves one layer input per decoder layer instead of every activation, and costs a second forward of
each layer in backward (~2N of ~4N FLOPs per token for a frozen 4-bit base, see :mod:`qlora_med.plan.estimate`):
``auto`` turns it **off** when the planned peak of the step without it fits the device's memory (less the planner's
margin), and **on** otherwise. The plan is :func:`qlora_med.plan.estimate.estimate_memory` of the stage as it will
run (the micro-batch and accumulation :func:`qlora_med.train.autobatch.resolve_batch` chose, padded or padding-free,
the recipe's LoRA and optimizer), on the device :func:`~qlora_med.train.autobatch.device_memory_gib` reports (the
GPU's memory, or the RAM available now on CPU). With ``per_device_batch_size: auto`` the planner already prefers
no checkpointing (:func:`~qlora_med.plan.estimate.choose_settings` tries it first), and this agrees with its choice.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from qlora_med.config.schema import RecipeConfig, StageConfig
from qlora_med.train.autobatch import device_memory_gib

logger = logging.getLogger(__name__)

MARGIN = 0.10  # the planner's default: fragmentation and what it does not model (choose_settings)


@dataclass(frozen=True)
class CheckpointingDecision:
    """Whether the stage checkpoints, what the recipe said, and why."""

    enabled: bool
    setting: bool | str
    planned_peak_gib: float | None = None
    budget_gib: float | None = None
    device: str | None = None

    def summary(self) -> dict:
        """Plain data for ``stage.json``."""
        return dataclasses.asdict(self)


def decide(planned_peak_gib: float, device_gib: float, margin: float = MARGIN) -> bool:
    """Checkpointing on exactly when the step planned without it exceeds ``(1 - margin)`` of the device."""
    return planned_peak_gib > device_gib * (1 - margin)


def resolve_checkpointing(recipe: RecipeConfig, stage: StageConfig, world_size: int, micro_batch: int,
                          accumulation: int, model_dir: Path | None = None) -> CheckpointingDecision:
    """The stage's checkpointing for this launch: as configured, or (``auto``) the planner's decision, logged; the
    model's shape from ``model_dir``'s config.json (the resolved base: no Hub request), else from the recipe."""
    if stage.gradient_checkpointing != "auto":
        return CheckpointingDecision(bool(stage.gradient_checkpointing), stage.gradient_checkpointing)
    import torch

    from qlora_med.plan.estimate import GIB, estimate_memory
    from qlora_med.plan.recipe import run_for_stage, shape_for_run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gib, name = device_memory_gib()
    fixed = dataclasses.replace(stage, per_device_batch_size=micro_batch, gradient_accumulation_steps=accumulation,
                                global_batch_size=None, gradient_checkpointing=False)  # fmt: skip
    run = run_for_stage(recipe, fixed, n_gpus=world_size, device=device)
    peak = estimate_memory(shape_for_run(recipe, model_dir), run).peak_bytes / GIB
    enabled = decide(peak, gib)
    logger.info(
        "stage %s: gradient checkpointing %s (auto): the step without it is planned at %.1f GiB, %s the %.1f GiB "
        "budget of %s (%.1f GiB less %.0f%%; micro-batch %d, max_length %d)", stage.name,
        "on" if enabled else "off", peak, "over" if enabled else "within", gib * (1 - MARGIN), name, gib,
        MARGIN * 100, micro_batch, stage.max_length,
    )  # fmt: skip
    return CheckpointingDecision(enabled, "auto", round(peak, 2), round(gib * (1 - MARGIN), 2), name)


def with_checkpointing(stage: StageConfig, decision: CheckpointingDecision) -> StageConfig:
    """The stage with its checkpointing resolved to a bool (what the model and trainer are built with)."""
    if stage.gradient_checkpointing == decision.enabled:
        return stage
    return dataclasses.replace(stage, gradient_checkpointing=decision.enabled)
