"""The planner with Hub ids: only config.json is fetched (through the HF cache, offline from it), known preset
names need no network, and LLaVA's original layout is planned with its tower."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
from helpers.hub_env import fetched_files, go_offline, serve_hub
from helpers.hub_standin import HubModel

from qlora_med.commands import plan as plan_cmd
from qlora_med.errors import QloraMedError
from qlora_med.plan.estimate import PRESETS, preset
from qlora_med.plan.recipe import shape_from_config_dict, shape_from_recipe

TEXT = {
    "num_hidden_layers": 4,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
VISION = {
    "num_hidden_layers": 4,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_attention_heads": 4,
    "image_size": 224,
    "patch_size": 14,
}
WEIGHTS = {"model.safetensors": b"\0" * 200_000}


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    with serve_hub(monkeypatch, tmp_path / "hf-cache") as server:
        yield server


def _recipe(**model) -> SimpleNamespace:
    fields = {
        "name_or_path": None,
        "vision_tower": None,
        "llm": None,
        "tiny": None,
        "revision": None,
        "projector_type": "mlp2x_gelu",
    }
    return SimpleNamespace(model=SimpleNamespace(**(fields | model)))


def test_a_hub_llava_is_planned_from_its_config_json_alone(hub, monkeypatch):
    config = {"model_type": "llava", "text_config": TEXT, "vision_config": VISION}
    hub.state.models["org/mid-llava"] = HubModel(
        {"config.json": json.dumps(config).encode(), **WEIGHTS}, revisions={"main", "v1"}
    )
    shape = shape_from_recipe(_recipe(name_or_path="org/mid-llava@v1"))
    assert (
        shape.name == "mid-llava" and shape.llm == preset("mid").llm and shape.vision == preset("mid").vision
    )
    assert fetched_files(hub) == {"config.json"}
    hub.state.requests.clear()
    go_offline(monkeypatch)
    assert shape_from_recipe(_recipe(name_or_path="org/mid-llava", revision="v1")).llm == preset("mid").llm
    assert hub.state.requests == []
    with pytest.raises(
        QloraMedError, match=r"Hub model 'org/other@main' is not in the local cache .* HF_HUB_OFFLINE=1"
    ):
        shape_from_recipe(_recipe(name_or_path="org/other"))


def test_compose_hub_ids_use_preset_names_else_their_config_json(hub):
    shape = shape_from_recipe(
        _recipe(vision_tower="openai/clip-vit-large-patch14-336", llm="mistralai/Mistral-7B-Instruct-v0.2")
    )
    assert shape.llm == preset("mistral-7b").llm and shape.vision == PRESETS["llava-med-v1.5"].vision
    assert hub.state.requests == []  # both known by name
    hub.state.models["org/tower"] = HubModel(
        {"config.json": json.dumps({"model_type": "clip", "vision_config": VISION}).encode(), **WEIGHTS}
    )
    hub.state.models["org/lm"] = HubModel(
        {"config.json": json.dumps({"model_type": "mistral", **TEXT}).encode(), **WEIGHTS}
    )
    shape = shape_from_recipe(_recipe(vision_tower="org/tower", llm="org/lm"))
    assert (
        shape.name == "tower + lm" and shape.llm == preset("mid").llm and shape.vision == preset("mid").vision
    )
    assert fetched_files(hub) == {"config.json"}


def test_original_llava_layout_is_planned_with_its_tower():
    config = {
        "model_type": "llava_mistral",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_projector_type": "mlp2x_gelu",
        **TEXT,
    }
    shape = shape_from_config_dict(config, name="llava-med")
    assert shape.vision == PRESETS["llava-med-v1.5"].vision and shape.projector == "mlp2x_gelu"
    assert shape.llm == preset("mid").llm


def test_plan_command_takes_a_hub_id(hub, capsys):
    config = {"model_type": "llava", "text_config": TEXT, "vision_config": VISION}
    hub.state.models["org/mid-llava"] = HubModel({"config.json": json.dumps(config).encode(), **WEIGHTS})
    parser = argparse.ArgumentParser()
    plan_cmd.add_arguments(parser)
    assert plan_cmd.main(parser.parse_args(["--model", "org/mid-llava", "--gpu", "24GB"])) == 0
    assert "Model  mid-llava: LLM" in capsys.readouterr().out
    preset_id = "microsoft/llava-med-v1.5-mistral-7b"  # a preset: planned without the Hub
    assert plan_cmd.main(parser.parse_args(["--model", preset_id])) == 0
    assert fetched_files(hub) == {"config.json"} and not any("llava-med" in r for r in hub.state.requests)
