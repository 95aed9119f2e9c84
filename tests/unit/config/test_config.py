"""Recipe schema: every recipe validates; bad keys, types, files and combinations fail before any load,
all of a recipe's problems in one error."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qlora_med.cli import main as cli_main
from qlora_med.config.files import validate_paths
from qlora_med.config.loader import load_recipe
from qlora_med.config.schema import DataConfig, StageConfig
from qlora_med.config.stages import TrainSpec
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
    recipe = load_recipe(
        ROOT / "recipes" / "llava_med_v15_24gb.yaml", ["model.vision_tower=./models/no-clip"]
    )
    with pytest.raises(
        ConfigError,
        match=r"model\.vision_tower: '\./models/no-clip' is neither an existing folder "
        r"nor a Hub model id; download",
    ):
        validate_paths(recipe)


def test_impossible_combinations_fail_early(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"stages\.align\.train: nothing to train"):
        load_recipe(DEMO, ["stages.align.train={projector: frozen, llm: frozen}"])  # no file check needed
    with pytest.raises(ConfigError, match="'plain' .* is for align stages"):
        load_recipe(DEMO, ["stages.instruct.template=plain"])
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


def test_schema_rules_hold_without_the_loader():
    data = DataConfig(path="x.json", image_folder="imgs")
    with pytest.raises(ConfigError, match=r"^stages\.s\.train: nothing to train"):
        StageConfig(name="s", kind="align", data=data, train=TrainSpec("frozen", "frozen"))
    with pytest.raises(
        ConfigError, match=r"^stages\.s\.template: 'plain' \(image then caption\) is for align"
    ):
        StageConfig(name="s", kind="vqa", data=data, template="plain")
    assert StageConfig(name="s", kind="align", data=data, template="plain").train == TrainSpec("full", "lora")


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_recipe(DEMO, ["lora.alpah=8", "stages.align.max_steps=ten", "stages.instruct.template=plain"])
    lines = str(info.value).splitlines()
    assert lines[0] == f"{DEMO}: 3 problems:"
    assert [line.strip() for line in lines[1:]] == [
        "unknown key 'lora.alpah'; did you mean 'alpha'?",
        "stages.align.max_steps: expected an integer, got 'ten'",
        "stages.instruct.template: 'plain' (image then caption) is for align stages; "
        "use mistral_instruct, vicuna_v1 or llava_med_v1",
    ]


def test_value_rules_of_one_section_are_all_reported():
    with pytest.raises(ConfigError) as info:
        load_recipe(
            DEMO,
            [
                "lora.r=0",
                "lora.dropout=1.5",
                "stages.align.warmup_ratio=2",
                "stages.align.max_steps=0",
                "stages.nope.seed=1",
            ],
        )
    message = str(info.value)
    assert message.startswith(f"{DEMO}: 5 problems:\n")
    for expected in (
        "lora: r and alpha must be positive",
        "lora.dropout must be in [0, 1), got 1.5",
        "stages.align.warmup_ratio must be in [0, 1)",
        "stages.align.max_steps must be -1",
        "override 'stages.nope.seed': no item named 'nope'",
    ):
        assert expected in message


def test_a_single_problem_reads_as_one_message():
    with pytest.raises(ConfigError) as info:
        load_recipe(DEMO, ["lora.alpah=8"])
    assert str(info.value) == f"{DEMO}: unknown key 'lora.alpah'; did you mean 'alpha'?"


def test_every_missing_file_is_reported(monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(
        DEMO,
        [
            "stages.align.data.path=nope.json",
            "stages.instruct.data.image_folder=nowhere",
            "stages.instruct.init_from=runs/none/final",
        ],
    )
    with pytest.raises(ConfigError) as info:
        validate_paths(recipe)
    lines = str(info.value).splitlines()
    assert lines[0] == "3 problems:"
    assert [line.strip() for line in lines[1:]] == [
        "stages.align.data.path: file 'nope.json' not found",
        "stages.instruct.data.image_folder: folder 'nowhere' not found",
        "stages.instruct.init_from: 'runs/none/final' has no projector.safetensors; "
        "point it at a finished stage's final/ folder (e.g. runs/x/instruct/final)",
    ]


def test_validate_without_files_still_checks_combinations(monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    caplog.set_level(logging.INFO)
    bad = ["stages.align.train.llm=frozen", "stages.align.train.projector=frozen"]
    assert cli_main(["validate", "recipes/demo_cpu.yaml", "--no-files", *bad]) == 1
    assert "stages.align.train: nothing to train (projector and llm both frozen)" in caplog.text
    assert not any(r.getMessage().endswith(": valid") for r in caplog.records)
    caplog.clear()
    assert cli_main(["validate", "recipes/demo_cpu.yaml", "--no-files"]) == 0
    assert "recipes/demo_cpu.yaml: valid" in caplog.text


def test_override_with_malformed_yaml_is_one_line():
    with pytest.raises(ConfigError, match=r"override 'stages.align.max_steps=\[1': the value is not valid YAML"):
        load_recipe(ROOT / "recipes" / "demo_cpu.yaml", ["stages.align.max_steps=[1"])
