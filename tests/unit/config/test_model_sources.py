"""A recipe's models: Hub ids accepted without a local folder, local folders checked by their config.json kind,
``model.revision`` rules, and ``qlora-med validate`` naming each model's kind (Hub: config.json only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from helpers.hub_env import fetched_files, serve_hub
from helpers.hub_standin import HubModel

from qlora_med.cli import main as cli_main
from qlora_med.config.files import model_sources, validate_paths
from qlora_med.config.loader import load_recipe
from qlora_med.config.model_kind import kind_of, read_kind
from qlora_med.config.model_ref import ModelRef
from qlora_med.config.schema import ModelConfig
from qlora_med.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "recipes" / "demo_cpu.yaml"
# the demo recipe without its tiny model: model.name_or_path is used as named
HUB_RECIPE = ["model.tiny=null"]


def _model_dir(path: Path, model_type: str | None, **extra) -> Path:
    path.mkdir(parents=True)
    config = {"model_type": model_type, **extra} if model_type else extra
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_kinds_from_config_json():
    assert str(kind_of({"model_type": "llava"})) == "llava (LLaVA 1.5 / LLaVA-Med v1.5, LlavaForConditionalGeneration)"
    for model_type in ("llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3"):  # the other families of the table
        assert kind_of({"model_type": model_type}).layout == "hf_llava"
    original = kind_of(
        {"model_type": "llava_mistral", "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
    )
    assert original.layout == "original_llava" and original.needs_conversion
    assert kind_of({"model_type": "llava_llama"}).needs_conversion
    assert kind_of({"model_type": "clip_vision_model"}, role="vision_tower").layout == "clip_vision"
    assert kind_of({"model_type": "clip"}, role="vision_tower").layout == "clip_vision"
    assert kind_of({"model_type": "mistral"}, role="llm").layout == "causal_lm"
    assert kind_of({}, role="llm").model_type == "unknown"  # the LLM is checked loosely
    for model_type in ("mllama", "idefics3"):
        with pytest.raises(ConfigError) as err:
            kind_of({"model_type": model_type}, where="model.name_or_path: 'models/x'")
        msg = str(err.value)
        assert msg.startswith(
            f"model.name_or_path: 'models/x' has model_type '{model_type}' in its config.json"
        )
        assert (
            "supported: llava (model_type llava: LLaVA 1.5" in msg and "llava_mistral / llava_llama" in msg
            and "gemma3" in msg and "qlora_med/config/families.py" in msg
        )
        assert "\n" not in msg
    with pytest.raises(
        ConfigError, match=r"has model_type 'siglip_vision_model'.*supported: clip or clip_vision"
    ):
        kind_of({"model_type": "siglip_vision_model"}, role="vision_tower")
    with pytest.raises(ConfigError, match="has no model_type in its config.json"):
        kind_of({"architectures": ["X"]})


def test_read_kind_needs_a_readable_config_json(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^'.*' has no config\.json, so it is not a Hugging Face model folder"
    ):
        read_kind(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(
        ConfigError, match=r"model\.llm: 'x': its config\.json cannot be read \(JSONDecodeError"
    ):
        read_kind(tmp_path, role="llm", where="model.llm: 'x'")
    assert read_kind(_model_dir(tmp_path / "m", "llava") / "config.json").model_type == "llava"


@pytest.mark.parametrize(
    "value, ref",
    [
        ("llava-hf/llava-1.5-7b-hf", ModelRef(repo_id="llava-hf/llava-1.5-7b-hf")),
        (
            "microsoft/llava-med-v1.5-mistral-7b@v1",
            ModelRef(repo_id="microsoft/llava-med-v1.5-mistral-7b", revision="v1"),
        ),
    ],
)
def test_hub_ids_validate_without_a_local_folder(tmp_path, monkeypatch, value, ref):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(DEMO, [*HUB_RECIPE, f"model.name_or_path={value}", f"output_dir={tmp_path}"])
    (source,) = validate_paths(recipe)  # no hub_config: nothing is fetched
    assert (source.key, source.ref, source.kind) == ("model.name_or_path", ref, None)
    assert str(source).startswith(f"model.name_or_path: Hub model {ref}: kind read from its config.json")


def test_model_revision_pins_a_hub_id_and_must_agree(tmp_path):
    (source,), problems = model_sources(ModelConfig(name_or_path="org/name", revision="v2"))
    assert source.ref == ModelRef(repo_id="org/name", revision="v2") and problems == []
    assert model_sources(ModelConfig(name_or_path="org/name@v2", revision="v2"))[0][0].ref.revision == "v2"
    with pytest.raises(
        ConfigError, match=r"model\.revision: 'v2' differs from the '@v1' in model\.name_or_path"
    ):
        ModelConfig(name_or_path="org/name@v1", revision="v2")
    with pytest.raises(ConfigError, match=r"model\.revision: pins model\.name_or_path only; in compose mode"):
        ModelConfig(vision_tower="openai/clip-vit-large-patch14-336", llm="org/llm", revision="v1")
    local = _model_dir(tmp_path / "llava", "llava")
    _, problems = model_sources(ModelConfig(name_or_path=str(local), revision="v1"))
    assert problems == [
        f"model.revision: 'v1' pins a Hub model, but model.name_or_path '{local}' is a local "
        "folder; drop model.revision, or name the Hub id (org/name)"
    ]


def test_bad_ids_and_unsupported_local_models_are_one_line_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in ("gpt2", "./models/none", "org/na--me", "org/name@"):
        _, problems = model_sources(ModelConfig(name_or_path=bad))
        assert len(problems) == 1 and problems[0].startswith(f"model.name_or_path: '{bad}'"), problems
        assert "org/name" in problems[0] and "\n" not in problems[0]
    _model_dir(tmp_path / "next", "mllama")
    _, problems = model_sources(ModelConfig(name_or_path="next"))
    assert len(problems) == 1 and problems[0].startswith(
        "model.name_or_path: 'next' has model_type 'mllama' in its config.json, which is not "
        "supported here; supported: llava (model_type llava: LLaVA 1.5 / LLaVA-Med v1.5), llava_next"
    ) and "to add one, write its Family entry" in problems[0]
    (tmp_path / "empty").mkdir()
    _, problems = model_sources(ModelConfig(name_or_path="empty"))
    assert problems[0].startswith("model.name_or_path: 'empty' has no config.json")
    original = _model_dir(tmp_path / "llava-med", "llava_mistral")
    (source,), problems = model_sources(ModelConfig(name_or_path=str(original)))
    assert problems == [] and source.kind.needs_conversion


def test_compose_mode_checks_the_tower_and_the_llm_loosely(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _model_dir(tmp_path / "clip", "clip_vision_model")
    _model_dir(tmp_path / "siglip", "siglip_vision_model")
    _model_dir(tmp_path / "llm", "some_new_lm")
    (tmp_path / "no-config").mkdir()
    sources, problems = model_sources(ModelConfig(vision_tower="clip", llm="llm"))
    assert problems == [] and [s.kind.layout for s in sources] == ["clip_vision", "causal_lm"]
    sources, problems = model_sources(
        ModelConfig(vision_tower="openai/clip-vit-large-patch14-336@main", llm="llm")
    )
    assert problems == [] and sources[0].ref.repo_id == "openai/clip-vit-large-patch14-336"
    _, problems = model_sources(ModelConfig(vision_tower="siglip", llm="no-config"))
    assert [p.split(" has ")[0] for p in problems] == [
        "model.vision_tower: 'siglip'",
        "model.llm: 'no-config'",
    ]


def test_validate_prints_the_kind_of_a_local_model(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    caplog.set_level(logging.INFO)
    local = _model_dir(tmp_path / "llava", "llava")
    assert cli_main(["validate", str(DEMO), *HUB_RECIPE, f"model.name_or_path={local}"]) == 0
    assert (
        f"model.name_or_path: folder '{local}': llava (LLaVA 1.5 / LLaVA-Med v1.5, LlavaForConditionalGeneration); "
        "family llava"
        in caplog.text
    )
    caplog.clear()
    assert cli_main(["validate", str(DEMO)]) == 0
    assert (
        "model.name_or_path: folder '.cache/qlora-med/tiny-llava-demo': tiny model built from model.tiny (family llava"
        in caplog.text
    )


def test_validate_reads_only_config_json_of_a_hub_model(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    caplog.set_level(logging.INFO)
    with serve_hub(monkeypatch, tmp_path / "hf-cache") as hub:
        weights = {"model.safetensors": b"\0" * 1000}
        hub.state.models["org/med"] = HubModel({"config.json": b'{"model_type": "llava_mistral"}', **weights})
        hub.state.models["org/next"] = HubModel({"config.json": b'{"model_type": "mllama"}', **weights})
        assert cli_main(["validate", str(DEMO), *HUB_RECIPE, "model.name_or_path=org/med"]) == 0
        assert (
            "model.name_or_path: Hub model org/med@main: llava_mistral (original LLaVA layout with a Mistral LLM"
            in caplog.text
        )
        caplog.clear()
        assert cli_main(["validate", str(DEMO), *HUB_RECIPE, "model.name_or_path=org/next"]) == 1
        assert (
            "model.name_or_path: Hub model 'org/next@main' has model_type 'mllama' in its config.json, which "
            "is not supported here"
        ) in caplog.text
        caplog.clear()
        assert cli_main(["validate", str(DEMO), *HUB_RECIPE, "model.name_or_path=org/missing"]) == 1
        assert "model.name_or_path: 'org/missing' is not a local folder and the Hub" in caplog.text
        assert fetched_files(hub) == {"config.json"}


def test_llava_15_original_release_is_told_apart_from_hf_llava() -> None:
    from qlora_med.config.model_kind import kind_of

    original = {"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"], "hidden_size": 4096,
                "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
    assert kind_of(original).needs_conversion
    assert not kind_of({"model_type": "llava", "text_config": {}, "vision_config": {}}).needs_conversion
