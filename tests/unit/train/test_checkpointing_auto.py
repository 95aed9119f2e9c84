"""`gradient_checkpointing: auto`: off when the planned step fits the device without it, on for the fewest leading
decoder layers that make it fit, on for all when nothing less does; logged and recorded in stage.json."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from pathlib import Path

import pytest
import yaml

from qlora_med.config.loader import load_recipe
from qlora_med.errors import ConfigError
from qlora_med.plan.estimate import GIB, choose_settings, estimate_memory, fewest_checkpointed_layers
from qlora_med.plan.recipe import run_for_stage, shape_from_recipe
from qlora_med.train import checkpointing
from qlora_med.train.checkpointing import checkpointed_layers, resolve_checkpointing, with_checkpointing

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "recipes" / "llava_med_v15_24gb.yaml"  # micro-batch 8 at 2048 tokens; shape known by name


def _run(recipe, stage, micro: int):
    fixed = dataclasses.replace(stage, per_device_batch_size=micro, gradient_accumulation_steps=128 // micro,
                                global_batch_size=None, gradient_checkpointing=False)  # fmt: skip
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    return run_for_stage(recipe, fixed, 1, device)


def _planned_gib(recipe, stage, micro: int, layers: int | bool) -> float:
    """Planned peak with the first ``layers`` decoder layers checkpointed (True: all, False: none)."""
    shape = shape_from_recipe(recipe)
    k = shape.llm.layers if layers is True else int(layers)
    return estimate_memory(shape, _run(recipe, stage, micro).with_checkpointed(k, shape.llm.layers)).peak_bytes / GIB


def test_each_checkpointed_layer_lowers_the_plan_and_the_fewest_that_fit_are_chosen():
    recipe = load_recipe(RECIPE, [])
    stage, shape = recipe.stage("align"), shape_from_recipe(recipe)
    peaks = [_planned_gib(recipe, stage, 8, k) for k in range(shape.llm.layers + 1)]
    assert all(a > b for a, b in itertools.pairwise(peaks))  # strictly: every layer trades activations for its input
    run = _run(recipe, stage, 8)
    for k in (0, 1, 13, shape.llm.layers):  # a budget just above k's peak needs exactly k layers
        assert fewest_checkpointed_layers(shape, run, (peaks[k] + 1e-6) * GIB) == k
        assert checkpointed_layers(shape, run, (peaks[k] + 1e-6) / 0.9) == k  # 90% of the device
    assert fewest_checkpointed_layers(shape, run, (peaks[-1] - 0.01) * GIB) is None
    assert checkpointed_layers(shape, run, peaks[-1] - 0.01) == shape.llm.layers  # nothing fits: all, as before
    # none and all are the whole-model estimates (per-layer checkpointing only adds the cases between)
    assert peaks[0] == pytest.approx(estimate_memory(shape, dataclasses.replace(run, grad_checkpointing=False))
                                     .peak_bytes / GIB)  # fmt: skip
    assert peaks[-1] == pytest.approx(estimate_memory(shape, dataclasses.replace(run, grad_checkpointing=True))
                                      .peak_bytes / GIB)  # fmt: skip


def test_fewer_checkpointed_layers_plan_less_recompute():
    from qlora_med.plan.estimate import step_flops

    recipe = load_recipe(RECIPE, [])
    shape, run = shape_from_recipe(recipe), _run(recipe, recipe.stage("align"), 8)
    flops = [step_flops(shape, run.with_checkpointed(k, 32)) for k in (0, 8, 16, 32)]
    assert flops[0] < flops[1] < flops[2] < flops[3]
    assert flops[2] - flops[0] == pytest.approx((flops[3] - flops[0]) / 2)  # recompute is linear in k


def test_auto_turns_checkpointing_off_when_the_step_fits_and_on_when_it_does_not(monkeypatch, caplog):
    recipe = load_recipe(RECIPE, ["stages.align.gradient_checkpointing=auto"])
    stage = recipe.stage("align")
    assert stage.gradient_checkpointing == "auto"
    without, with_ = _planned_gib(recipe, stage, 8, False), _planned_gib(recipe, stage, 8, True)
    assert with_ < without  # checkpointing is what saves the memory here
    roomy, between, tight = without / 0.9 + 1, (without + with_) / 2 / 0.9, (with_ - 0.5) / 0.9
    monkeypatch.setattr(checkpointing, "device_memory_gib", lambda: (roomy, "roomy card"))
    with caplog.at_level(logging.INFO, logger="qlora_med.train.checkpointing"):
        off = resolve_checkpointing(recipe, stage, 1, 8, 16)
    assert off.enabled is False and off.setting == "auto" and off.device == "roomy card" and off.layers is None
    assert off.planned_peak_gib == off.planned_peak_without_gib == pytest.approx(without, abs=0.01)
    assert "gradient checkpointing off (auto)" in caplog.text and "within" in caplog.text
    monkeypatch.setattr(checkpointing, "device_memory_gib", lambda: (between, "mid card"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qlora_med.train.checkpointing"):
        some = resolve_checkpointing(recipe, stage, 1, 8, 16)
    assert some.enabled is True and 0 < some.layers < 32 and some.of_layers == 32
    assert some.budget_gib == pytest.approx(0.9 * between, abs=0.01)
    assert _planned_gib(recipe, stage, 8, some.layers) <= 0.9 * between < _planned_gib(recipe, stage, 8, some.layers - 1)
    assert some.planned_peak_gib == pytest.approx(_planned_gib(recipe, stage, 8, some.layers), abs=0.01)
    assert f"on for the first {some.layers} of 32 layers (auto)" in caplog.text
    resolved = with_checkpointing(stage, some)
    assert resolved.gradient_checkpointing is True and stage.gradient_checkpointing == "auto"
    assert with_checkpointing(resolved, some) is resolved
    monkeypatch.setattr(checkpointing, "device_memory_gib", lambda: (tight, "small card"))
    every = resolve_checkpointing(recipe, stage, 1, 8, 16)
    assert every.enabled is True and every.layers is None  # nothing fits: every layer, the smallest plan


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
        layers = decision.layers or (32 if decision.enabled else 0)
        assert _planned_gib(recipe, stage, micro, layers) <= 0.9 * gib
        if layers:  # one fewer layer would not fit
            assert _planned_gib(recipe, stage, micro, layers - 1) > 0.9 * gib
        choice = choose_settings(shape_from_recipe(recipe), gib, 1, 128, stage.max_length,
                                 base=_run(recipe, stage, 1), min_seq=stage.max_length)  # fmt: skip
        assert choice.run.micro_batch == micro and choice.run.checkpointed(32) == layers


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
