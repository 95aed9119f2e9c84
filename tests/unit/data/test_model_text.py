"""What encoding needs of a model (:mod:`qlora_med.data.model_text`) is what training reads of it, for every
family: the processor's image tokens and image token, the chat format for ``chat_template``; ``data preview`` and
``data check`` encode with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from qlora_med.cli import main as cli
from qlora_med.config.families import FAMILIES
from qlora_med.config.schema import ModelConfig, TinyModelConfig
from qlora_med.data.model_text import load_model_text
from qlora_med.data.preview import recipe_model_text
from qlora_med.errors import ConfigError
from qlora_med.model.family import family_of_dir, image_spec, load_processor
from qlora_med.model.tiny import build_tiny_model
from qlora_med.prompts.templates import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "recipes" / "demo_cpu.yaml")
SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (folder of its tiny model, the ImageSpec training computes for it at ``side``)."""
    root, built = tmp_path_factory.mktemp("families"), {}

    def get(family: str, side: int | None = None):
        if family not in built:
            built[family] = build_tiny_model(TinyModelConfig(family=family), root / family)
        folder = built[family]
        processor = load_processor(folder, family_of_dir(folder))
        return folder, image_spec(AutoConfig.from_pretrained(folder), processor, side)

    return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_image_tokens_and_token_are_the_processors(tiny, family):
    folder, spec = tiny(family)
    text = load_model_text(str(folder))
    assert (text.image_tokens, text.tokenizer.convert_tokens_to_ids(text.image_token)) == (
        spec.tokens, spec.image_token_id
    )
    assert text.image_token == FAMILIES[family].image_token and text.chat is None
    if FAMILIES[family].image_tokens != "fixed":  # any-res / dynamic: the count follows model.image_size
        _, smaller = tiny(family, 28)  # the tiny processors cap larger sides
        assert load_model_text(str(folder), image_size=28).image_tokens == smaller.tokens != spec.tokens


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl", "llava_next"])
def test_chat_format_only_for_chat_template(tiny, family):
    folder, _ = tiny(family)
    text = load_model_text(str(folder), template="chat_template")
    assert text.chat is not None and text.chat.image_token == text.image_token
    assert text.chat.turn_end == FAMILIES[family].turn_end


def test_chat_template_without_a_family_processor_is_one_config_error(tiny, tmp_path):
    folder, _ = tiny("llava")  # the tiny LLaVA ships no chat template
    with pytest.raises(ConfigError, match="has no chat template"):
        load_model_text(str(folder), template="chat_template")
    with pytest.raises(ConfigError, match="default Mistral tokenizer is not a model of a supported family"):
        load_model_text(None, template="chat_template")
    composed = ModelConfig(name_or_path=None, vision_tower=str(tmp_path), llm=str(tmp_path))
    with pytest.raises(ConfigError, match="compose mode"):
        recipe_model_text(composed, "chat_template")


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
def test_preview_of_a_chat_template_stage(tiny, family, tmp_path, capsys):
    folder, spec = tiny(family)
    options = ["data", "preview", str(SAMPLE / "instruct.json"), "--recipe", RECIPE, "--stage", "instruct",
               "--limit", "2"]
    overrides = [f"model.name_or_path={folder}", f"model.tiny.family={family}",
                 "stages.instruct.template=chat_template", f"output_dir={tmp_path / 'run'}"]
    assert cli([*options, "--json", *overrides]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["template"] == "chat_template" and report["num_image_tokens"] == spec.tokens
    assert report["image_token_id"] == spec.image_token_id and len(report["records"]) == 2
    for row in report["records"]:
        assert "problem" not in row and any(label != IGNORE_INDEX for label in row["labels"])
        assert row["input_ids"].count(spec.image_token_id) == spec.tokens
    assert cli([*options, *overrides]) == 0
    out = capsys.readouterr().out
    assert f"{FAMILIES[family].image_token}x{spec.tokens}" in out and f"{FAMILIES[family].turn_end}]" in out


def test_data_check_with_a_family_chat_template(tiny, capsys):
    folder, spec = tiny("gemma3")
    code = cli(["data", "check", str(SAMPLE / "instruct.json"), "--image-folder", str(SAMPLE / "images"),
                "--tokenizer", str(folder), "--template", "chat_template"])
    out = capsys.readouterr().out
    assert code == 0 and f"(template chat_template, {spec.tokens} image tokens)" in out
    assert "OK: every record is usable" in out
