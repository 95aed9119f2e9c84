"""Hub ids in ``model:`` through the model builders: ``base_model_dir`` (kind checked on config.json before any
weights download, ``model.revision``, ``model.allow_pickle``) and ``compose`` (cached by snapshot commit)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.hub_env import fetched_files, file_requests, folder_files, go_offline, serve_hub
from helpers.hub_standin import HubModel

from qlora_med.config.schema import ModelConfig
from qlora_med.errors import ConfigError
from qlora_med.model.build import base_model_dir, compose


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    with serve_hub(monkeypatch, tmp_path / "hf-cache") as server:
        yield server


def test_base_model_dir_downloads_a_hub_llava_into_the_cache(hub, tiny_dir, tmp_path, monkeypatch):
    hub.state.models["org/tiny-llava"] = model = HubModel(folder_files(tiny_dir), revisions={"main", "v1"})
    folder = base_model_dir(ModelConfig(name_or_path="org/tiny-llava"))
    assert folder.is_relative_to((tmp_path / "hf-cache").resolve()) and folder.name == model.sha
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny_dir.iterdir())
    assert (folder / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    hub.state.requests.clear()
    assert base_model_dir(ModelConfig(name_or_path="org/tiny-llava", revision="v1")) == folder
    assert base_model_dir(ModelConfig(name_or_path=f"org/tiny-llava@{model.sha}")) == folder
    assert file_requests(hub) == []  # cache hits: revision look-ups only
    hub.state.requests.clear()
    go_offline(monkeypatch)
    assert base_model_dir(ModelConfig(name_or_path="org/tiny-llava")) == folder and hub.state.requests == []


def test_an_unsupported_hub_model_is_refused_before_its_weights_download(hub):
    weights = b"\0" * 100_000
    hub.state.models["org/next"] = HubModel(
        {"config.json": b'{"model_type": "mllama"}', "model.safetensors": weights}
    )
    with pytest.raises(ConfigError) as err:
        base_model_dir(ModelConfig(name_or_path="org/next"))
    assert str(err.value).startswith(
        "model.name_or_path: Hub model 'org/next@main' has model_type 'mllama'"
    )
    assert fetched_files(hub) == {"config.json"}


def test_pickle_weights_only_with_allow_pickle(hub, tiny_dir):
    files = {k: v for k, v in folder_files(tiny_dir).items() if k != "model.safetensors"}
    hub.state.models["org/old"] = HubModel({**files, "pytorch_model.bin": b"pickle bytes"})
    with pytest.raises(ConfigError, match=r"no \.safetensors weights.*model\.allow_pickle: true"):
        base_model_dir(ModelConfig(name_or_path="org/old"))
    folder = base_model_dir(ModelConfig(name_or_path="org/old", allow_pickle=True))
    assert (folder / "pytorch_model.bin").read_bytes() == b"pickle bytes"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny CLIP vision tower and a tiny Mistral (with tokenizer), as the files of two Hub repos."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

    from qlora_med.model.processor import mistral_tokenizer

    root = tmp_path_factory.mktemp("hub-parts")
    torch.manual_seed(0)
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
    ).save_pretrained(root / "clip")
    MistralForCausalLM(
        MistralConfig(
            vocab_size=32000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).save_pretrained(root / "llm")
    mistral_tokenizer(root / "llm").save_pretrained(root / "llm")
    return folder_files(root / "clip"), folder_files(root / "llm")


def test_compose_from_hub_ids_is_cached_by_commit(hub, parts, tmp_path):
    from transformers import LlavaForConditionalGeneration

    clip, llm = parts
    hub.state.models["openai/tiny-clip"] = HubModel(clip)
    hub.state.models["mistralai/tiny-llm"] = HubModel(llm)
    cfg = ModelConfig(
        vision_tower="openai/tiny-clip", llm="mistralai/tiny-llm@main", cache_dir=str(tmp_path / "c")
    )
    out = compose(cfg)
    assert LlavaForConditionalGeneration.from_pretrained(out).config.vision_config.image_size == 28
    hub.state.requests.clear()
    assert compose(cfg) == out and file_requests(hub) == []  # same commits: the composed folder is reused
    config = json.loads(llm["config.json"]) | {"rms_norm_eps": 1e-5}
    hub.state.models["mistralai/tiny-llm"] = HubModel({**llm, "config.json": json.dumps(config).encode()})
    assert compose(cfg) != out  # a new commit of the LLM is a new composition
    hub.state.models["openai/tiny-clip"] = HubModel({**llm})  # a Mistral where the tower should be
    with pytest.raises(
        ConfigError,
        match=r"model\.vision_tower: Hub model 'openai/tiny-clip@main' has model_type "
        r"'mistral'.*supported: clip or clip_vision_model",
    ):
        compose(cfg)
