"""A recipe whose ``model.name_or_path`` is a Hub id, through the real CLI (``qlora-med run``) against the Hub
stand-in: the first run downloads the tiny LLaVA into the HF cache and trains; a second run makes no file request;
offline with an empty cache it stops with one clear line and exit code 1."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from helpers.hub_env import fetched_files, file_requests, folder_files, go_offline, serve_hub
from helpers.hub_standin import HubModel

from qlora_med.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
REPO = "org/tiny-llava"


@pytest.fixture()
def recipe(tmp_path) -> Path:
    """The demo recipe's align stage, 2 steps, on the Hub id instead of a locally built tiny model."""
    data = yaml.safe_load((ROOT / "recipes" / "demo_cpu.yaml").read_text())
    data["model"] = {
        "name_or_path": REPO,
        "quantization": "nf4",
        "compute_dtype": "fp32",
        "cache_dir": str(tmp_path / "kit-cache"),
    }
    stage = data["stages"][0]
    stage["data"] = {k: str(ROOT / v) for k, v in stage["data"].items()}
    stage.update(max_steps=2, per_device_batch_size=2, logging_steps=1, save_steps=100, max_length=128)
    data["stages"] = [stage]
    path = tmp_path / "hub_recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_downloads_once_trains_and_reuses_the_cache(recipe, tiny_dir, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    cache = tmp_path / "hf-cache"
    with serve_hub(monkeypatch, cache) as hub:
        hub.state.models[REPO] = model = HubModel(folder_files(tiny_dir))
        assert cli_main(["run", str(recipe), f"output_dir={tmp_path / 'run1'}"]) == 0
        # configs, tokenizer and the safetensors weights
        assert fetched_files(hub) == set(folder_files(tiny_dir))
        info = json.loads((tmp_path / "run1" / "align" / "final" / "stage.json").read_text())
        assert info["steps"] == 2 and Path(info["base_model"]).is_relative_to(cache.resolve())
        assert Path(info["base_model"]).name == model.sha

        hub.state.requests.clear()
        assert cli_main(["run", str(recipe), f"output_dir={tmp_path / 'run2'}"]) == 0
        assert json.loads((tmp_path / "run2" / "align" / "final" / "stage.json").read_text())["steps"] == 2
        assert file_requests(hub) == []  # a cache hit: the revision look-up only
        assert all(f"/api/models/{REPO}/revision/main" in r for r in hub.state.requests)

        caplog.clear()
        hub.state.requests.clear()
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
        go_offline(monkeypatch)
        assert cli_main(["run", str(recipe), f"output_dir={tmp_path / 'run3'}"]) == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors == [
            f"model.name_or_path: Hub model '{REPO}@main' is not in the local cache "
            f"({tmp_path / 'empty-cache'}) and HF_HUB_OFFLINE=1 forbids downloading it: download it "
            f"once with network access (`hf download {REPO}`, or this command without "
            "HF_HUB_OFFLINE), or unset HF_HUB_OFFLINE"
        ]
        assert hub.state.requests == []


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl", "gemma3"])
def test_other_families_train_from_a_hub_id(family, recipe, tmp_path, monkeypatch, caplog):
    """Each family's tiny model served as a Hub repo: validate names the family, and the align stage trains with
    the model's own chat template from the files the download brought (processor, chat template, tokenizer)."""
    from qlora_med.config.schema import TinyModelConfig
    from qlora_med.model.tiny import build_tiny_model

    folder = build_tiny_model(TinyModelConfig(family=family), tmp_path / family)
    repo = f"org/tiny-{family}"
    overrides = [f"model.name_or_path={repo}", "stages.align.template=chat_template", f"output_dir={tmp_path / 'run'}"]
    with serve_hub(monkeypatch, tmp_path / "hf-cache") as hub:
        hub.state.models[repo] = HubModel(folder_files(folder))
        caplog.set_level(logging.INFO)
        assert cli_main(["validate", str(recipe), *overrides]) == 0
        assert f"family {family}" in caplog.text
        assert cli_main(["run", str(recipe), *overrides]) == 0
        assert {"chat_template.jinja", "preprocessor_config.json"} & fetched_files(hub)
    info = json.loads((tmp_path / "run" / "align" / "final" / "stage.json").read_text())
    assert info["steps"] == 2 and info["template"] == "chat_template" and info["loss_first"] > 0
