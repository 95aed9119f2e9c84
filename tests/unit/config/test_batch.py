"""global_batch_size is kept for any process count, or refused with the numbers and the fix."""

from __future__ import annotations

import pytest

from qlora_med.config.batch import stage_batch
from qlora_med.config.schema import DataConfig, StageConfig
from qlora_med.errors import ConfigError


def stage(**kw) -> StageConfig:
    return StageConfig(name="align", kind="align", data=[DataConfig(path="d.json", image_folder="img")], **kw)


@pytest.mark.parametrize(("processes", "accumulation"), [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)])
def test_accumulation_is_derived_for_any_process_count(processes: int, accumulation: int) -> None:
    batch = stage_batch(
        stage(per_device_batch_size=8, gradient_accumulation_steps="auto", global_batch_size=128), processes
    )
    assert (batch.micro_batch, batch.accumulation, batch.global_batch) == (8, accumulation, 128)


def test_global_batch_that_cannot_be_made_is_refused() -> None:
    auto = stage(per_device_batch_size=8, gradient_accumulation_steps="auto", global_batch_size=128)
    with pytest.raises(
        ConfigError, match=r"global_batch_size 128 is not a multiple of micro-batch 8 x 3 process"
    ):
        stage_batch(auto, 3)
    fixed = stage(per_device_batch_size=8, gradient_accumulation_steps=16, global_batch_size=128)
    assert stage_batch(fixed, 1).global_batch == 128
    with pytest.raises(
        ConfigError,
        match=r"8 x accumulation 16 x 2 process\(es\) = 256, not global_batch_size 128; "
        r"set gradient_accumulation_steps: auto",
    ):
        stage_batch(fixed, 2)


def test_unset_global_batch_follows_the_process_count() -> None:
    assert stage_batch(stage(per_device_batch_size=4, gradient_accumulation_steps=2), 2).global_batch == 16


def test_auto_accumulation_needs_a_global_batch() -> None:
    with pytest.raises(ConfigError, match="derived from global_batch_size; set it"):
        stage(per_device_batch_size=8, gradient_accumulation_steps="auto")
    with pytest.raises(
        ConfigError, match="per_device_batch_size auto needs gradient_accumulation_steps auto"
    ):
        stage(per_device_batch_size="auto", gradient_accumulation_steps=4, global_batch_size=128)

