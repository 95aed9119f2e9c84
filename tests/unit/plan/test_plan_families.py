"""The planner knows each family: image tokens per image equal what the real processor and model use (the tiny
models built from config), and the families' published shapes plan offline by Hub id."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_med.config.families import FAMILIES
from qlora_med.config.loader import load_recipe
from qlora_med.errors import ConfigError
from qlora_med.plan.estimate import RunSpec, estimate_memory, preset
from qlora_med.plan.recipe import shape_from_recipe

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "recipes" / "demo_cpu.yaml"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_planned_image_tokens_are_the_models(family, tmp_path):
    from transformers import AutoConfig

    from qlora_med.model.family import image_spec, load_processor
    from qlora_med.model.tiny import build_tiny_model

    recipe = load_recipe(DEMO, [f"model.name_or_path={tmp_path / 'tiny'}", f"model.tiny.family={family}"])
    if family != "llava":
        with pytest.raises(ConfigError, match=r"model\.tiny\.family: the tiny .* run the recipe once"):
            shape_from_recipe(recipe)
    build_tiny_model(recipe.model.tiny, tmp_path / "tiny")
    shape = shape_from_recipe(recipe)
    real = image_spec(AutoConfig.from_pretrained(tmp_path / "tiny"), load_processor(tmp_path / "tiny", FAMILIES[family]))
    assert shape.image_tokens == real.tokens > 0
    assert shape.llm.vocab > 0 and shape.vision is not None


@pytest.mark.parametrize(
    ("hub_id", "tokens", "projector_m"),
    [("llava-hf/llava-1.5-7b-hf", 576, 21.0), ("llava-hf/llava-v1.6-mistral-7b-hf", 2928, 21.0),
     ("Qwen/Qwen2.5-VL-7B-Instruct", 256, 44.6), ("google/gemma-3-4b-it", 256, 3.0)],
)  # fmt: skip
def test_family_hub_ids_plan_offline(hub_id, tokens, projector_m, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shape = preset(hub_id)
    assert shape.image_tokens == tokens
    assert shape.projector_params / 1e6 == pytest.approx(projector_m, abs=0.1)
    recipe = load_recipe(DEMO, [f"model.name_or_path={hub_id}", "model.tiny=null"])
    assert shape_from_recipe(recipe) == shape


def test_anyres_tiles_count_in_the_tower_memory():
    shape = preset("llava-hf/llava-v1.6-mistral-7b-hf")
    single = preset("llava-1.5-7b")
    run = RunSpec(micro_batch=2, seq_len=4096)
    vision = {c.name: c.bytes for c in estimate_memory(shape, run).components}["vision forward (all hidden states)"]
    base = {c.name: c.bytes for c in estimate_memory(single, run).components}["vision forward (all hidden states)"]
    assert vision > 3 * base  # the base image + 4 tiles through the tower
