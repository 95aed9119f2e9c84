"""Gradient checkpointing: ``auto``'s decision (how many decoder layers the budget needs) and turning it on.

Checkpointing saves one layer input per decoder layer instead of every activation, and costs a second forward of
each layer in backward (~2N of ~4N FLOPs per token for a frozen 4-bit base, see :mod:`qlora_med.plan.estimate`).
``auto`` checkpoints the **fewest** leading decoder layers that bring the planned peak within the device's memory
(less the planner's margin): none when the step fits without it, all when nothing less fits, else the first k, so
the recompute costs k/L of a full checkpointing's. The plan is :func:`qlora_med.plan.estimate.estimate_memory` of the
stage as it will run (the micro-batch and accumulation :func:`qlora_med.train.autobatch.resolve_batch` chose, padded
or padding-free, the recipe's LoRA and optimizer), on the device :func:`~qlora_med.train.autobatch.device_memory_gib`
reports (the GPU's memory, or the RAM available now on CPU). With ``per_device_batch_size: auto`` the planner
already minimises the checkpointed layers (:func:`~qlora_med.plan.estimate.choose_settings`), and this agrees.

:func:`enable_checkpointing` turns transformers' activation checkpointing on and then off again for every layer but
the first k of the language model's decoder (the frozen vision tower needs none: no gradient flows through it).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from qlora_med.config.schema import RecipeConfig, StageConfig
from qlora_med.plan.estimate import GIB, ModelShape, RunSpec, estimate_memory, fewest_checkpointed_layers
from qlora_med.train.autobatch import device_memory_gib

logger = logging.getLogger(__name__)

MARGIN = 0.10  # the planner's default: fragmentation and what it does not model (choose_settings)


@dataclass(frozen=True)
class CheckpointingDecision:
    """Whether the stage checkpoints, how many of the decoder's layers (None: all), what the recipe said, why."""

    enabled: bool
    setting: bool | str
    layers: int | None = None
    of_layers: int | None = None
    planned_peak_gib: float | None = None  # the step as it will run
    planned_peak_without_gib: float | None = None  # the step without checkpointing
    budget_gib: float | None = None
    device: str | None = None

    def summary(self) -> dict:
        """Plain data for ``stage.json``."""
        return dataclasses.asdict(self)


def checkpointed_layers(shape: ModelShape, run: RunSpec, device_gib: float, margin: float = MARGIN) -> int:
    """``auto``'s rule: the fewest leading decoder layers to checkpoint for ``run``'s planned step to fit
    ``(1 - margin)`` of the device (0: off); every layer when nothing less fits."""
    k = fewest_checkpointed_layers(shape, run, device_gib * (1 - margin) * GIB)
    return shape.llm.layers if k is None else k


def resolve_checkpointing(recipe: RecipeConfig, stage: StageConfig, world_size: int, micro_batch: int,
                          accumulation: int, model_dir: Path | None = None) -> CheckpointingDecision:
    """The stage's checkpointing for this launch: as configured, or (``auto``) the planner's decision, logged; the
    model's shape from ``model_dir``'s config.json (the resolved base: no Hub request), else from the recipe."""
    if stage.gradient_checkpointing != "auto":
        return CheckpointingDecision(bool(stage.gradient_checkpointing), stage.gradient_checkpointing)
    import torch

    from qlora_med.plan.recipe import run_for_stage, shape_for_run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gib, name = device_memory_gib()
    fixed = dataclasses.replace(stage, per_device_batch_size=micro_batch, gradient_accumulation_steps=accumulation,
                                global_batch_size=None, gradient_checkpointing=False)  # fmt: skip
    run = run_for_stage(recipe, fixed, n_gpus=world_size, device=device)
    shape = shape_for_run(recipe, model_dir)
    total = shape.llm.layers
    k = checkpointed_layers(shape, run, gib)
    without = estimate_memory(shape, run).peak_bytes / GIB
    chosen = estimate_memory(shape, run.with_checkpointed(k, total)).peak_bytes / GIB
    budget = gib * (1 - MARGIN)
    what = "off" if k == 0 else "on for every layer" if k == total else f"on for the first {k} of {total} layers"
    logger.info(
        "stage %s: gradient checkpointing %s (auto): the step without it is planned at %.1f GiB, %s the %.1f GiB "
        "budget of %s (%.1f GiB less %.0f%%; micro-batch %d, max_length %d)%s", stage.name, what, without,
        "over" if k else "within", budget, name, gib, MARGIN * 100, micro_batch, stage.max_length,
        f"; with it {chosen:.1f} GiB" if k else "",
    )  # fmt: skip
    return CheckpointingDecision(k > 0, "auto", k if 0 < k < total else None, total, round(chosen, 2),
                                 round(without, 2), round(budget, 2), name)


def with_checkpointing(stage: StageConfig, decision: CheckpointingDecision) -> StageConfig:
    """The stage with its checkpointing resolved to a bool (what the model and trainer are built with)."""
    if stage.gradient_checkpointing == decision.enabled:
        return stage
    return dataclasses.replace(stage, gradient_checkpointing=decision.enabled)


def enable_checkpointing(model, layers: int | None = None) -> int:
    """Checkpoint the first ``layers`` decoder layers of ``model``'s language model (None: all), nothing else;
    returns how many are checkpointed. Non-reentrant, so no input needs ``requires_grad``."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    decoder = list(model.get_decoder().layers)
    keep = {id(layer) for layer in decoder[: len(decoder) if layers is None else layers]}
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = id(module) in keep
    count = len(keep)
    logger.info("gradient checkpointing on %d of %d decoder layers", count, len(decoder))
    return count
