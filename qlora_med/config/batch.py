"""How a stage's batch settings become micro-batch x accumulation for a given number of processes.

``global_batch_size`` is a promise: the samples per optimizer step over all processes, whatever the GPU
count. With ``gradient_accumulation_steps: auto`` the accumulation is derived from it (micro-batch fixed here,
or picked by the memory planner in ``qlora_med.train.autobatch``); fixed values are checked against it. A
combination that cannot make it is refused with the numbers and the fix. Without ``global_batch_size`` the
global batch is micro-batch x accumulation x processes, as configured.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_med.config.schema import StageConfig
from qlora_med.errors import ConfigError


@dataclass(frozen=True)
class StageBatch:
    """Micro-batch per process, accumulation steps and process count of one stage."""

    micro_batch: int
    accumulation: int
    processes: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.processes


def derive_accumulation(stage: StageConfig, micro_batch: int, processes: int) -> int:
    """``global_batch_size / (micro_batch x processes)``; a ConfigError when it does not divide."""
    per_step = micro_batch * processes
    if stage.global_batch_size % per_step:
        raise ConfigError(
            f"stages.{stage.name}: global_batch_size {stage.global_batch_size} is not a multiple of micro-batch "
            f"{micro_batch} x {processes} process(es) = {per_step}; choose a per_device_batch_size (or a process "
            "count) that divides it"
        )
    return stage.global_batch_size // per_step


def stage_batch(stage: StageConfig, processes: int) -> StageBatch:
    """The batch of a stage whose micro-batch is fixed (``per_device_batch_size: auto`` is the planner's)."""
    if stage.per_device_batch_size == "auto":
        raise ValueError("per_device_batch_size auto is resolved by the memory planner (qlora_med.train.autobatch)")
    micro = stage.per_device_batch_size
    if stage.gradient_accumulation_steps == "auto":
        return StageBatch(micro, derive_accumulation(stage, micro, processes), processes)
    batch = StageBatch(micro, stage.gradient_accumulation_steps, processes)
    if stage.global_batch_size is not None and batch.global_batch != stage.global_batch_size:
        raise ConfigError(
            f"stages.{stage.name}: micro-batch {micro} x accumulation {batch.accumulation} x {processes} "
            f"process(es) = {batch.global_batch}, not global_batch_size {stage.global_batch_size}; set "
            "gradient_accumulation_steps: auto to derive it for any process count"
        )
    return batch
