"""A stage's micro-batch x accumulation for this launch: as configured or derived from ``global_batch_size``
(:mod:`qlora_med.config.batch`), or ``per_device_batch_size: auto`` from the memory planner for the device."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from qlora_med.config.batch import stage_batch
from qlora_med.config.schema import RecipeConfig, StageConfig
from qlora_med.errors import ConfigError

logger = logging.getLogger(__name__)


def device_memory_gib() -> tuple[float, str]:
    """Memory of one training device: the GPU's total, or the RAM available now on CPU."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory / 2**30, props.name
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20, "CPU RAM"
    raise ConfigError("per_device_batch_size: auto needs /proc/meminfo on CPU; set the batch explicitly")


def resolve_batch(recipe: RecipeConfig, stage: StageConfig, world_size: int,
                  model_dir: Path | None = None) -> tuple[int, int]:
    """(micro-batch, accumulation) for ``world_size`` processes: fixed or derived, or the planner's largest
    micro-batch that fits (the model's shape from ``model_dir``, else the recipe). Logs the global batch it makes."""
    if stage.per_device_batch_size != "auto":
        batch = stage_batch(stage, world_size)
        unset = "" if stage.global_batch_size is not None else " (global_batch_size unset: it follows the process count)"
        logger.info("stage %s: global batch %d = micro-batch %d x accumulation %d x %d process(es)%s", stage.name,
                    batch.global_batch, batch.micro_batch, batch.accumulation, world_size, unset)
        return batch.micro_batch, batch.accumulation
    from qlora_med.plan.estimate import choose_settings
    from qlora_med.plan.recipe import run_for_stage, shape_for_run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gib, name = device_memory_gib()
    fixed = dataclasses.replace(stage, per_device_batch_size=1, gradient_accumulation_steps=1, global_batch_size=None)
    base = run_for_stage(recipe, fixed, n_gpus=world_size, device=device)
    choice = choose_settings(shape_for_run(recipe, model_dir), gib, n_gpus=world_size, global_batch=stage.global_batch_size,
                             seq=stage.max_length, base=base, min_seq=stage.max_length)
    if choice is None:
        raise ConfigError(
            f"stages.{stage.name}: no micro-batch fits {gib:.1f} GiB ({name}) at max_length {stage.max_length}; "
            "lower max_length or run `qlora-med plan` for options"
        )
    micro, accum = choice.run.micro_batch, choice.run.grad_accum
    logger.info("auto batch for %s on %s (%.1f GiB): micro-batch %d x accumulation %d x %d device(s) = %d; "
                "planned peak %.1f GiB", stage.name, name, gib, micro, accum, world_size,
                micro * accum * world_size, choice.estimate.peak_bytes / 2**30)
    if choice.run.grad_checkpointing != stage.gradient_checkpointing or choice.run.optimizer != base.optimizer:
        logger.info("the planner would also use gradient_checkpointing=%s, optimizer %s (see `qlora-med plan`)",
                    choice.run.grad_checkpointing, choice.run.optimizer)
    return micro, accum
