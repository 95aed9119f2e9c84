"""Recipe schema: every recipe validates; bad keys, types, files and combinations fail before any load."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_med.config.files import validate_paths
from qlora_med.config.loader import load_recipe
from qlora_med.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
DEMO = ROOT / "recipes" / "demo_cpu.yaml"


def test_recipes_are_found_recursively():
    assert DEMO in RECIPES and len(RECIPES) >= 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.stages and all(s.template and s.train for s in recipe.stages)
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), "a recipe opens with a comment saying what it trains"
    assert "Launch:" in path.read_text() and "Memory:" in path.read_text()


def test_demo_recipe_files_exist(monkeypatch):
    monkeypatch.chdir(ROOT)
    validate_paths(load_recipe(DEMO))


def test_stage_presets_fill_unset_fields():
    recipe = load_recipe(DEMO)
    align, instruct = recipe.stages
    assert (align.template, align.train.projector, align.train.llm) == ("plain", "full", "lora")
    assert instruct.template == "mistral_instruct"
    assert recipe.stage("instruct").learning_rate == 5e-3  # the YAML value wins over the preset


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(DEMO.read_text() + text)
    return path


def test_unknown_key_names_the_nearest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'lora\.alpah'; did you mean 'alpha'\?"):
        load_recipe(DEMO, ["lora.alpah=8"])
    with pytest.raises(ConfigError, match=r"unknown key 'lora\.rank'; valid keys: \['alpha', 'dropout', 'r'"):
        load_recipe(DEMO, ["lora.rank=8"])
    with pytest.raises(ConfigError, match=r"unknown key 'stages\.align\.lerning_rate'.*'learning_rate'"):
        load_recipe(DEMO, ["stages.align.lerning_rate=1e-4"])


def test_wrong_types_and_values_name_the_key():
    with pytest.raises(ConfigError, match=r"stages\.align\.max_steps: expected an integer, got 'ten'"):
        load_recipe(DEMO, ["stages.align.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"model\.quantization: 'nf5' is not one of .*did you mean 'nf4'"):
        load_recipe(DEMO, ["model.quantization=nf5"])
    with pytest.raises(ConfigError, match=r"stages\.align\.template: unknown template 'mistral'"):
        load_recipe(DEMO, ["stages.align.template=mistral"])
    with pytest.raises(ConfigError, match="lora: r and alpha must be positive"):
        load_recipe(DEMO, ["lora.r=0"])


def test_overrides_address_stages_by_name():
    recipe = load_recipe(DEMO, ["stages.instruct.max_steps=3", "seed=7", "model.compute_dtype=fp32"])
    assert recipe.stage("instruct").max_steps == 3 and recipe.stage("align").max_steps == 40
    assert recipe.seed == 7 and recipe.model.compute_dtype == "fp32"
    with pytest.raises(ConfigError, match=r"no item named 'stage2' \(have \['align', 'instruct'\]\)"):
        load_recipe(DEMO, ["stages.stage2.max_steps=3"])


def test_missing_files_are_named(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"stages\.align\.data\.path: file 'nope\.json' not found"):
        validate_paths(load_recipe(DEMO, ["stages.align.data.path=nope.json"]))
    recipe = load_recipe(ROOT / "recipes" / "llava_med_v15_24gb.yaml")
    with pytest.raises(ConfigError, match=r"model\.vision_tower: directory .* not found; download"):
        validate_paths(recipe)


def test_impossible_combinations_fail_early(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="nothing to train"):
        validate_paths(load_recipe(DEMO, ["stages.align.train={projector: frozen, llm: frozen}"]))
    with pytest.raises(ConfigError, match="'plain' .* is for align stages"):
        validate_paths(load_recipe(DEMO, ["stages.instruct.template=plain"]))
    with pytest.raises(ConfigError, match="set either model.name_or_path or model.vision_tower"):
        load_recipe(DEMO, ["model.llm=x", "model.vision_tower=y"])
    with pytest.raises(ConfigError, match=r"duplicate stage names \['align'\]"):
        load_recipe(DEMO, ["stages.instruct.name=align"])
    with pytest.raises(ConfigError, match="vision_tower: 'full' is not one of"):
        load_recipe(DEMO, ["stages.align.train={vision_tower: full}"])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
