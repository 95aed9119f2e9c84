"""A stage that continues an earlier adapter: its settings are checked before loading, and reported as trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_med.config.families import FAMILIES
from qlora_med.config.loader import load_recipe
from qlora_med.config.schema import LoraConfig
from qlora_med.errors import ConfigError
from qlora_med.model.load import lora_target_regex
from qlora_med.train.trainable import check_continued_adapter, lora_settings

LLAVA = FAMILIES["llava"]

ROOT = Path(__file__).resolve().parents[3]
DATA = [
    f"stages.{name}.data.{key}={ROOT / 'data/sample' / value}"
    for name, file in (("align", "alignment.json"), ("instruct", "instruct.json"))
    for key, value in (("path", file), ("image_folder", "images"))
]


def _fake_final(folder: Path, **adapter) -> Path:
    """A previous stage's final/ with a hand-written PEFT adapter_config.json (weights are never read)."""
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
              "target_modules": lora_target_regex(LoraConfig(), LLAVA), **adapter}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    (folder / "projector.safetensors").write_bytes(b"")
    return folder


def _recipe(sample_recipe, *overrides):
    return load_recipe(ROOT / "recipes" / "demo_cpu.yaml", [*sample_recipe, *DATA, *overrides])


def test_matching_adapter_passes(tmp_path, sample_recipe):
    recipe = _recipe(sample_recipe)
    check_continued_adapter(recipe.stage("instruct"), recipe.lora, _fake_final(tmp_path / "final"))


def test_differing_adapter_is_refused_naming_stage_folder_keys_values_and_fix(tmp_path, sample_recipe):
    final = _fake_final(tmp_path / "final", r=4, lora_alpha=8,
                        target_modules=lora_target_regex(LoraConfig(target_modules=["v_proj", "q_proj"]), LLAVA))
    recipe = _recipe(sample_recipe)
    with pytest.raises(ConfigError) as err:
        check_continued_adapter(recipe.stage("instruct"), recipe.lora, final)
    msg = str(err.value)
    assert msg.startswith(f"stages.instruct: continues the LoRA adapter in {final}")
    assert "lora.r: adapter 4, recipe 16" in msg and "lora.alpha: adapter 8, recipe 32" in msg
    assert "lora.target_modules: adapter ['q_proj', 'v_proj'], recipe ['down_proj', 'gate_proj'," in msg
    assert "dropout" not in msg  # only the keys that differ
    assert "Set lora.r=4, lora.alpha=8, lora.target_modules=['q_proj', 'v_proj'] in the recipe" in msg
    assert "or start stage 'instruct' from a folder without an adapter" in msg


def test_only_a_stage_that_continues_training_the_adapter_is_checked(tmp_path, sample_recipe):
    final = _fake_final(tmp_path / "final", r=4)
    frozen = _recipe(sample_recipe, "stages.instruct.train.llm=frozen")
    check_continued_adapter(frozen.stage("instruct"), frozen.lora, final)  # adapter carried along untouched
    recipe = _recipe(sample_recipe)
    check_continued_adapter(recipe.stage("instruct"), recipe.lora, None)  # first stage: new adapter
    (tmp_path / "no_adapter").mkdir()
    check_continued_adapter(recipe.stage("instruct"), recipe.lora, tmp_path / "no_adapter")  # projector-only final/
    (final / "adapter_config.json").unlink()
    with pytest.raises(ConfigError, match="has adapter_model.safetensors but no adapter_config.json"):
        check_continued_adapter(recipe.stage("instruct"), recipe.lora, final)


def test_lora_settings_reads_our_regex_a_list_or_a_foreign_regex():
    cfg = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}
    ours = lora_target_regex(LoraConfig(target_modules=["v_proj", "q_proj"]), LLAVA)
    assert lora_settings({**cfg, "target_modules": ours}) == {"r": 8, "alpha": 16, "dropout": 0.1,
                                                              "target_modules": ["q_proj", "v_proj"]}
    assert lora_settings({**cfg, "target_modules": {"v_proj", "q_proj"}})["target_modules"] == ["q_proj", "v_proj"]
    assert lora_settings({**cfg, "target_modules": "all-linear"})["target_modules"] == "all-linear"


def test_train_stage_refuses_before_loading_any_model(tmp_path, sample_recipe, monkeypatch):
    import qlora_med.train.runner as runner

    def no_model(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the adapter check")

    monkeypatch.setattr(runner, "base_model_dir", no_model)
    monkeypatch.setattr(runner, "load_model", no_model)
    final = _fake_final(tmp_path / "prev" / "final", r=4)
    recipe = _recipe(sample_recipe, f"stages.instruct.init_from={final}")
    with pytest.raises(ConfigError, match=r"stages\.instruct: continues the LoRA adapter .*lora\.r: adapter 4"):
        runner.train_stage(recipe, recipe.stage("instruct"))


def test_run_recipe_refuses_an_init_from_adapter_before_training_earlier_stages(tmp_path, sample_recipe, monkeypatch):
    import qlora_med.train.runner as runner

    trained = []
    monkeypatch.setattr(runner, "train_stage", lambda _recipe, stage: trained.append(stage.name))
    final = _fake_final(tmp_path / "prev" / "final", lora_dropout=0.0)
    recipe = _recipe(sample_recipe, f"stages.instruct.init_from={final}")
    with pytest.raises(ConfigError, match=r"lora\.dropout: adapter 0\.0, recipe 0\.05"):
        runner.run_recipe(recipe)
    assert trained == []


def test_stage_json_reports_the_adapter_trained_not_the_recipe(tmp_path, sample_recipe):
    """align creates an r=4 adapter; instruct (LLM frozen) carries it on under a recipe saying r=16."""
    from qlora_med.train.runner import run_recipe

    steps = ["stages.align.max_steps=1", "stages.instruct.max_steps=1", "stages.align.save_steps=100",
             "stages.instruct.save_steps=100", "stages.align.per_device_batch_size=2",
             "stages.instruct.per_device_batch_size=2"]
    [align] = run_recipe(_recipe(sample_recipe, *steps, "lora.r=4", "lora.alpha=8",
                                 "lora.target_modules=[q_proj, v_proj]"), only="align")
    assert align["lora"] == {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    recipe = _recipe(sample_recipe, *steps, "stages.instruct.train.llm=frozen")
    assert recipe.lora.r == 16
    [instruct] = run_recipe(recipe, only="instruct")
    saved = json.loads((Path(recipe.output_dir) / "instruct" / "final" / "stage.json").read_text())
    assert saved["lora"] == instruct["lora"] == align["lora"]
    assert saved["train"]["llm"] == "frozen"
    adapter = json.loads((Path(recipe.output_dir) / "instruct" / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 4
