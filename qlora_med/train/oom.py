"""Out-of-memory fallback: halve the micro-batch, double accumulation, continue from the last step.

The global batch (micro-batch × accumulation × devices) never changes, so the optimisation is the
same run; only the memory per forward pass shrinks. On OOM we save a checkpoint at the current
optimizer step (partially accumulated gradients are dropped: that micro-batch group is redone),
rebuild the trainer with the smaller micro-batch and resume from that checkpoint. The sampler's
order of samples does not depend on the batch size, so resuming skips exactly the samples seen.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qlora_med.errors import QloraMedError
from qlora_med.train.checkpoints import (
    last_complete_checkpoint,
    remove_incomplete_checkpoints,
    set_aside_bad_checkpoints,
)

if TYPE_CHECKING:
    from qlora_med.train.trainer import StageTrainer

logger = logging.getLogger(__name__)


@dataclass
class BatchPlan:
    """Micro-batch and accumulation actually used; their product is the per-device global batch."""

    micro_batch: int
    accumulation: int
    halvings: int = 0

    def halve(self) -> BatchPlan:
        return BatchPlan(self.micro_batch // 2, self.accumulation * 2, self.halvings + 1)


def _free_memory(model: torch.nn.Module | None = None) -> None:
    if model is not None:
        model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_with_oom_fallback(make_trainer: Callable[[BatchPlan], StageTrainer], plan: BatchPlan,
                            output_dir: Path) -> tuple[StageTrainer, BatchPlan]:
    """Run ``trainer.train`` and, on out-of-memory, retry with half the micro-batch. Returns the trainer and plan."""
    while True:
        trainer = make_trainer(plan)
        remove_incomplete_checkpoints(output_dir)
        set_aside_bad_checkpoints(output_dir)
        resume = last_complete_checkpoint(output_dir)
        if resume is not None:
            logger.info("resuming from %s", resume)
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            return trainer, plan
        except torch.OutOfMemoryError as err:
            if plan.micro_batch == 1:
                raise QloraMedError(
                    "out of memory even at micro-batch 1: lower max_length, keep gradient_checkpointing on, "
                    "use optim: paged_adamw_8bit, or see `qlora-med plan` for settings that fit this card"
                ) from err
            step = trainer.state.global_step
            _free_memory(trainer.model)
            if step > 0 and not (output_dir / f"checkpoint-{step}").is_dir():
                trainer.save_checkpoint_now()
            smaller = plan.halve()
            logger.warning(
                "out of memory at step %d with micro-batch %d: continuing with micro-batch %d x accumulation %d "
                "(global batch unchanged)", step, plan.micro_batch, smaller.micro_batch, smaller.accumulation,
            )
            plan = smaller
            del trainer
            _free_memory()
