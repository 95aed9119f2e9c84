"""The family table: lookups, the unsupported-architecture error, and validate's family checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from qlora_med.cli import main as cli_main
from qlora_med.config.families import FAMILIES, family_of, hf_class_name
from qlora_med.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
QWEN = ROOT / "recipes" / "qwen2_5_vl_7b_med_24gb.yaml"


def test_every_family_names_its_parts_and_a_transformers_class():
    import transformers

    for family in FAMILIES.values():
        assert getattr(transformers, family.hf_class)  # the class exists in the pinned transformers
        assert family.templates and family.vision_tower.startswith("model.")
        assert all(path.startswith("model.") for path in family.connector)
        assert family.quant_skip[-1] == "lm_head" and family.vision_tower in family.quant_skip
        for model_type in family.model_types:
            assert getattr(transformers, hf_class_name(model_type))
    assert hf_class_name("qwen2_vl") == "Qwen2VLForConditionalGeneration"
    assert family_of("qwen2_vl") is FAMILIES["qwen2_5_vl"]


def test_an_unknown_architecture_lists_the_families_and_how_to_add_one():
    with pytest.raises(ConfigError) as err:
        family_of("mllama", where="model.name_or_path: 'models/x'")
    msg = str(err.value)
    assert msg.startswith("model.name_or_path: 'models/x': model_type 'mllama' is not a supported VLM family")
    assert all(name in msg for name in FAMILIES) and "qlora_med/config/families.py" in msg and "\n" not in msg


def _folder(path: Path, model_type: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "text_config": {}}))
    return path


def test_validate_names_the_family_and_refuses_a_template_it_does_not_take(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    gemma = _folder(tmp_path / "gemma", "gemma3")
    assert cli_main(["validate", str(QWEN), "--no-files", f"model.name_or_path={gemma}"]) == 0
    caplog.clear()
    assert cli_main(["validate", str(QWEN), f"model.name_or_path={gemma}"]) == 1  # data files missing too
    assert "family gemma3" in caplog.text or "model.image_size" in caplog.text
    caplog.clear()
    args = ["validate", str(QWEN), f"model.name_or_path={gemma}", "stages.instruct.template=mistral_instruct",
            "model.image_size=null"]
    assert cli_main(args) == 1
    assert ("stages.instruct.template: 'mistral_instruct' is not a Gemma 3 format; gemma3 takes chat_template"
            in caplog.text)
    caplog.clear()
    assert cli_main(["validate", str(QWEN), f"model.name_or_path={gemma}"]) == 1
    assert "model.image_size: gemma3 takes images at its tower's own size; remove model.image_size" in caplog.text
    qwen = _folder(tmp_path / "qwen", "qwen2_5_vl")
    caplog.clear()
    assert cli_main(["validate", str(QWEN), f"model.name_or_path={qwen}", "model.image_size=450"]) == 1
    assert "model.image_size: 450 must be a positive multiple of 28 for qwen2_5_vl" in caplog.text
