"""`gradient_checkpointing: auto`: off when the planned step fits the device without it, on otherwise; logged and
recorded in stage.json."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import yaml

from qlora_med.config.loader import load_recipe
from qlora_med.errors import ConfigError
from qlora_med.plan.estimate import GIB, estimate_memory
from qlora_med.plan.recipe import run_for_stage, shape_from_recipe
from qlora_med.train import checkpointing
from qlora_med.train.checkpointing import decide, resolve_checkpointing, with_checkpointing

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "recipes" / "llava_med_v15_24gb.yaml"  # micro-batch 8 at 2048 tokens; shape known by name


def _planned_gib(recipe, stage, micro: int, ckpt: bool) -> float:
    fixed = dataclasses.replace(stage, per_device_batch_size=micro, gradient_accumulation_steps=128 // micro,
                                global_batch_size=None, gradient_checkpointing=ckpt)  # fmt: skip
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    return estimate_memory(shape_from_recipe(recipe), run_for_stage(recipe, fixed, 1, device)).peak_bytes / GIB


def test_decide_is_the_planner_budget():
    assert decide(17.9, 20.0) is False and decide(18.1, 20.0) is True  # budget = 90% of the device
    assert decide(10.0, 20.0, margin=0.6) is True


def test_auto_turns_checkpointing_off_when_the_step_fits_and_on_when_it_does_not(monkeypatch, caplog):
    recipe = load_recipe(RECIPE, ["stages.align.gradient_checkpointing=auto"])
    stage = recipe.stage("align")
    assert stage.gradient_checkpointing == "auto"
    without, with_ = _planned_gib(recipe, stage, 8, False), _planned_gib(recipe, stage, 8, True)
    assert with_ < without  # checkpointing is what saves the memory here
    roomy, tight = without / 0.9 + 1, (without + with_) / 2 / 0.9
    monkeypatch.setattr(checkpointing, "device_memory_gib", lambda: (roomy, "roomy card"))
    with caplog.at_level(logging.INFO, logger="qlora_med.train.checkpointing"):
        off = resolve_checkpointing(recipe, stage, 1, 8, 16)
    assert off.enabled is False and off.setting == "auto" and off.device == "roomy card"
    assert off.planned_peak_gib == pytest.approx(without, abs=0.01)
    assert "gradient checkpointing off (auto)" in caplog.text and "within" in caplog.text
    monkeypatch.setattr(checkpointing, "device_memory_gib", lambda: (tight, "tight card"))
    on = resolve_checkpointing(recipe, stage, 1, 8, 16)
    assert on.enabled is True and on.budget_gib == pytest.approx(0.9 * tight, abs=0.01)
    resolved = with_checkpointing(stage, on)
    assert resolved.gradient_checkpointing is True and stage.gradient_checkpointing == "auto"
    assert with_checkpointing(resolved, on) is resolved


def test_auto_agrees_with_the_auto_batch_planner(monkeypatch):
    from qlora_med.train import autobatch
    from qlora_med.train.autobatch import resolve_batch

    overrides = [f"stages.align.{k}=auto" for k in ("gradient_checkpointing", "per_device_batch_size",
                                                    "gradient_accumulation_steps")]  # fmt: skip
    recipe = load_recipe(RECIPE, overrides)
    stage = recipe.stage("align")
    for gib in (12.0, 80.0):
        monkeypatch.setattr(autobatch, "device_memory_gib", lambda gib=gib: (gib, "card"))
        monkeypatch.setattr(checkpointing, "device_memory_gib", lambda gib=gib: (gib, "card"))
        micro, accum = resolve_batch(recipe, stage, 1)
        decision = resolve_checkpointing(recipe, stage, 1, micro, accum)
        assert _planned_gib(recipe, stage, micro, decision.enabled) <= 0.9 * gib
        if not decision.enabled:
            continue
        assert _planned_gib(recipe, stage, micro, False) > 0.9 * gib  # on only when off does not fit


def test_fixed_settings_are_kept_without_asking_the_device(monkeypatch):
    monkeypatch.setattr(checkpointing, "device_memory_gib", lambda: pytest.fail("device asked"))
    for value in (True, False):
        recipe = load_recipe(RECIPE, [f"stages.align.gradient_checkpointing={str(value).lower()}"])
        decision = resolve_checkpointing(recipe, recipe.stage("align"), 1, 8, 16)
        assert decision.enabled is value and decision.setting is value


def test_other_values_are_refused():
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_recipe(RECIPE, ["stages.align.gradient_checkpointing=sometimes"])


def test_stage_json_records_the_decision(tmp_path, tiny_dir, monkeypatch):
    """One real step through ``run_recipe``: auto resolves off on a roomy device, the model trains without it."""
    from qlora_med.train.runner import run_recipe

    monkeypatch.setattr(checkpointing, "device_memory_gib", lambda: (64.0, "test RAM"))
    recipe = yaml.safe_load((ROOT / "recipes" / "demo_cpu.yaml").read_text())
    stage = next(s for s in recipe["stages"] if s["name"] == "instruct")
    stage["data"] = {k: str(ROOT / v) for k, v in stage["data"].items()}
    stage.update(max_steps=1, logging_steps=1, save_steps=100, per_device_batch_size=2, gradient_checkpointing="auto")
    recipe["stages"] = [stage]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(path, [f"output_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_dir}"]))
    info = json.loads((tmp_path / "run" / "instruct" / "final" / "stage.json").read_text())
    assert info["gradient_checkpointing"]["enabled"] is False
    assert info["gradient_checkpointing"]["setting"] == "auto" and info["gradient_checkpointing"]["device"] == "test RAM"
    saved = yaml.safe_load((tmp_path / "run" / "instruct" / "final" / "resolved_config.yaml").read_text())
    assert saved["stages"][0]["gradient_checkpointing"] == "auto"  # the recipe as written, the decision in stage.json
