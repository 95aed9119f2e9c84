"""The run folder reader: the saved recipe, which ``final/`` a path means, stage chains, start points.

Built from files only (no training): the layout ``qlora-med run`` writes, as documented in run_dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qlora_med.artifacts.run_dir import (
    FINAL,
    RESOLVED_CONFIG,
    STAGE_JSON,
    previous_final,
    resolve_trained,
    saved_recipe,
    stage_chain,
    stage_info,
)
from qlora_med.config.loader import load_recipe
from qlora_med.errors import QloraMedError

ROOT = Path(__file__).resolve().parents[3]
RECIPE = {"output_dir": "RUN", "stages": [{"name": "align"}, {"name": "instruct"}]}


def _final(run: Path, stage: str, previous: Path | None, recipe: dict) -> Path:
    final = run / stage / FINAL
    final.mkdir(parents=True)
    (final / STAGE_JSON).write_text(json.dumps({"stage": stage, "previous_stage": str(previous) if previous else None}))
    (final / RESOLVED_CONFIG).write_text(yaml.safe_dump(recipe))
    return final


@pytest.fixture
def run(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / RESOLVED_CONFIG).write_text(yaml.safe_dump(RECIPE))
    return run


def test_saved_recipe_of_run_final_and_checkpoint(run):
    align = _final(run, "align", None, {**RECIPE, "model": {"double_quant": False}})
    (run / "align" / RESOLVED_CONFIG).write_text(yaml.safe_dump({**RECIPE, "model": {"double_quant": True}}))
    checkpoint = run / "align" / "checkpoint-2"
    checkpoint.mkdir()
    assert saved_recipe(run) == RECIPE
    assert saved_recipe(align)["model"] == {"double_quant": False}  # final/'s own copy first
    assert saved_recipe(checkpoint)["model"] == {"double_quant": True}  # a checkpoint: its stage's
    assert saved_recipe(run.parent / "nothing-here") == {}
    (checkpoint / RESOLVED_CONFIG).write_text("")
    assert saved_recipe(checkpoint) == {}  # an empty file is no recipe, not None


def test_resolve_trained_picks_the_last_finished_stage(run):
    with pytest.raises(QloraMedError, match="not a run directory"):
        resolve_trained(run)  # no stage finished yet
    align = _final(run, "align", None, RECIPE)
    assert resolve_trained(run) == align
    instruct = _final(run, "instruct", align, RECIPE)
    assert resolve_trained(run) == instruct  # recipe order, not directory order
    assert resolve_trained(run / "instruct") == instruct
    checkpoint = run / "instruct" / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "projector.safetensors").write_bytes(b"")
    assert resolve_trained(checkpoint) == checkpoint
    assert stage_info(checkpoint)["stage"] == "instruct"  # the stage.json of the final/ beside it


def test_stage_chain_follows_previous_stage(run):
    align = _final(run, "align", None, RECIPE)
    instruct = _final(run, "instruct", align, RECIPE)
    assert [s["stage"] for s in stage_chain(instruct)] == ["align", "instruct"]
    assert [s["stage"] for s in stage_chain(align)] == ["align"]
    with pytest.raises(QloraMedError, match="no stage.json"):
        stage_info(run)


def test_previous_final(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "demo_cpu.yaml", [f"output_dir={tmp_path / 'out'}"])
    first, second = recipe.stages[0], recipe.stages[1]
    assert previous_final(recipe, first) is None
    with pytest.raises(QloraMedError, match="run the earlier stage first"):
        previous_final(recipe, second)
    (tmp_path / "out" / first.name / FINAL).mkdir(parents=True)
    assert previous_final(recipe, second) == tmp_path / "out" / first.name / FINAL
