"""`per_device_batch_size: auto` asks the memory planner and keeps the global batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_med.config.loader import load_recipe
from qlora_med.errors import ConfigError
from qlora_med.train.autobatch import resolve_batch

ROOT = Path(__file__).resolve().parents[3]
AUTO = ["stages.align.per_device_batch_size=auto", "stages.align.gradient_accumulation_steps=auto"]


@pytest.mark.parametrize("gib, world", [(24.0, 1), (12.0, 1), (16.0, 4)])
def test_auto_batch_fits_the_device_and_keeps_the_global_batch(monkeypatch, gib, world):
    import qlora_med.train.autobatch as autobatch
    from qlora_med.plan.estimate import estimate_memory
    from qlora_med.plan.recipe import run_for_stage, shape_from_recipe

    monkeypatch.setattr(autobatch, "device_memory_gib", lambda: (gib, "test card"))
    recipe = load_recipe(ROOT / "recipes" / "llava_med_v15_24gb.yaml", AUTO)
    stage = recipe.stage("align")
    micro, accum = resolve_batch(recipe, stage, world)
    assert micro * accum * world == stage.global_batch_size == 128
    import dataclasses

    chosen = dataclasses.replace(stage, per_device_batch_size=micro, gradient_accumulation_steps=accum)
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    run = run_for_stage(recipe, chosen, n_gpus=world, device=device)
    assert estimate_memory(shape_from_recipe(recipe), run).peak_bytes <= 0.9 * gib * 2**30


def test_explicit_batch_is_kept():
    recipe = load_recipe(ROOT / "recipes" / "demo_cpu.yaml")
    assert resolve_batch(recipe, recipe.stage("align"), 1) == (4, 1)


def test_half_auto_is_rejected():
    with pytest.raises(ConfigError, match="per_device_batch_size auto needs gradient_accumulation_steps auto"):
        load_recipe(ROOT / "recipes" / "demo_cpu.yaml", AUTO[:1])
