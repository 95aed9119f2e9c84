"""Hub ids for models: ``resolve_model`` against a local stand-in for the Hub (127.0.0.1 only, see hub_standin.py)."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

import pytest
import torch
from helpers.hub_standin import HubModel, HubStandIn
from safetensors.torch import load_file, save

from qlora_med.config.model_ref import ModelRef, parse_model_ref
from qlora_med.errors import ConfigError, QloraMedError
from qlora_med.model.source import resolve_model

TOKEN = "hf_test_token_do_not_print_0123456789"
WEIGHTS = save({"w": torch.arange(60_000, dtype=torch.float32)})  # 240 KB


def _repo(**extra: bytes) -> dict[str, bytes]:
    return {"config.json": json.dumps({"model_type": "llava"}).encode(),
            "tokenizer_config.json": b"{}", "merges.txt": b"a b\n", "chat_template.jinja": b"{{ messages }}",
            "README.md": b"# card", **extra}


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    with HubStandIn(TOKEN) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks plain HTTP, not Xet
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
        yield server


def _file_requests(hub) -> list[str]:
    return [r for r in hub.state.requests if "/resolve/" in r]


def test_parse_model_ref_local_path_wins_then_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_model_ref("org/name") == ModelRef(path=Path("org/name"))
    assert parse_model_ref("llava-hf/llava-1.5-7b-hf") == ModelRef(repo_id="llava-hf/llava-1.5-7b-hf")
    assert parse_model_ref("mistralai/Mistral-7B-Instruct-v0.2@refs/pr/3") == ModelRef(
        repo_id="mistralai/Mistral-7B-Instruct-v0.2", revision="refs/pr/3")
    for bad in ("models/x/y", "./missing", "gpt2", "org/na--me", "org/name@"):
        with pytest.raises(ConfigError, match=rf"model\.llm: '{bad}'.*(org/name|revision)"):
            parse_model_ref(bad, key="model.llm")


def test_local_folder_is_used_as_is_without_network(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path
    (tmp_path / "weights.safetensors").write_bytes(WEIGHTS)
    with pytest.raises(ConfigError, match="is a file; point it at the model folder"):
        resolve_model(str(tmp_path / "weights.safetensors"))


def test_first_download_fetches_only_needed_files_then_cache_hit(hub, tmp_path, caplog):
    hub.state.models["org/tiny"] = HubModel(_repo(**{"model.safetensors": WEIGHTS, "pytorch_model.bin": b"pickle",
                                                     "consolidated.safetensors": WEIGHTS,
                                                     "original/params.json": b"{}"}))
    caplog.set_level(logging.INFO, logger="qlora_med")
    folder = resolve_model("org/tiny")
    assert folder.is_relative_to(tmp_path / "hf-cache") and folder.name == hub.state.models["org/tiny"].sha
    assert sorted(p.name for p in folder.iterdir()) == [
        "chat_template.jinja", "config.json", "merges.txt", "model.safetensors", "tokenizer_config.json"]
    assert torch.equal(load_file(folder / "model.safetensors")["w"], torch.arange(60_000, dtype=torch.float32))
    fetched = {r.split("/resolve/")[1].split("/", 1)[1] for r in _file_requests(hub)}
    assert fetched == {"config.json", "tokenizer_config.json", "merges.txt", "chat_template.jinja", "model.safetensors"}
    assert f"org/tiny@main resolved to {folder}" in caplog.text

    hub.state.requests.clear()
    assert resolve_model("org/tiny") == folder  # cache hit: only the revision look-up, no file request
    assert _file_requests(hub) == [] and all("/api/models/org/tiny/revision/main" in r for r in hub.state.requests)


def test_revision_pins_a_commit(hub):
    model = hub.state.models["org/tiny"] = HubModel(_repo(**{"model.safetensors": WEIGHTS}), revisions={"main", "v1"})
    assert resolve_model("org/tiny@v1").name == model.sha
    assert resolve_model(f"org/tiny@{model.sha}").name == model.sha
    with pytest.raises(ConfigError, match=r"model\.name_or_path: Hub model 'org/tiny' has no revision 'v9'.*drop '@v9'"):
        resolve_model("org/tiny@v9")


def test_interrupted_download_resumes_with_a_range_request(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)  # chunks reach the disk before the cut
    hub.state.models["org/tiny"] = HubModel(_repo(**{"model.safetensors": WEIGHTS}))
    hub.state.cut_file, hub.state.cut_next = "org/tiny/model.safetensors", 1
    folder = resolve_model("org/tiny")
    assert hub.state.cut_next == 0  # the connection was dropped once, half way
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    resumed = [r for r in hub.state.ranges if r]
    assert len(resumed) == 1 and 0 < int(resumed[0].removeprefix("bytes=").rstrip("-")) < len(WEIGHTS)


def test_wrong_id_names_the_id_and_the_fix(hub):
    with pytest.raises(ConfigError) as err:
        resolve_model("org/no-such-model", key="model.llm")
    msg = str(err.value)
    assert "model.llm: 'org/no-such-model' is not a local folder" in msg and "check the id" in msg
    assert "no token is set; set HF_TOKEN" in msg and "\n" not in msg


def test_private_repo_needs_the_token_which_is_never_shown(hub, monkeypatch, caplog):
    hub.state.models["org/private"] = HubModel(_repo(**{"model.safetensors": WEIGHTS}), private=True)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigError, match="no token is set"):
        resolve_model("org/private")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_also_secret_987654321")
    with pytest.raises(ConfigError, match="the token in use .* cannot read it") as err:
        resolve_model("org/private")
    assert "hf_wrong_token" not in "".join(traceback.format_exception(err.value))

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = resolve_model("org/private")
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    assert f"Bearer {TOKEN}" in hub.state.auth_headers
    assert TOKEN not in caplog.text and "hf_wrong_token" not in caplog.text


def test_gated_repo_says_to_accept_the_conditions(hub):
    hub.state.models["org/gated"] = HubModel(_repo(**{"model.safetensors": WEIGHTS}), gated=True)
    with pytest.raises(ConfigError, match=r"Hub model 'org/gated' is gated: accept its conditions at http://127\.0\.0\.1"):
        resolve_model("org/gated")


def test_pickle_only_repo_is_refused_unless_allowed(hub):
    hub.state.models["org/old"] = HubModel(_repo(**{"pytorch_model.bin": b"pickle bytes"}))
    with pytest.raises(ConfigError, match=r"Hub model 'org/old@main' has no \.safetensors weights.*model\.allow_pickle: true"):
        resolve_model("org/old")
    assert not any("pytorch_model.bin" in r for r in hub.state.requests)
    folder = resolve_model("org/old", allow_pickle=True)
    assert (folder / "pytorch_model.bin").read_bytes() == b"pickle bytes"


def test_offline_mode_uses_the_cache_without_requests_or_names_the_missing_id(hub, monkeypatch):
    from huggingface_hub import constants

    hub.state.models["org/tiny"] = HubModel(_repo(**{"model.safetensors": WEIGHTS}))
    folder = resolve_model("org/tiny")
    hub.state.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("org/tiny") == folder and hub.state.requests == []
    with pytest.raises(QloraMedError) as err:
        resolve_model("org/never-downloaded", key="model.vision_tower")
    msg = str(err.value)
    assert msg.startswith("model.vision_tower: Hub model 'org/never-downloaded@main' is not in the local cache")
    assert "HF_HUB_OFFLINE=1" in msg and "unset HF_HUB_OFFLINE" in msg and hub.state.requests == []


def test_unreachable_hub_is_one_clear_line(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(QloraMedError) as err:
        resolve_model("org/tiny")
    msg = str(err.value)
    assert msg.startswith("model.name_or_path: could not download Hub model 'org/tiny@main' from http://127.0.0.1:9")
    assert "check the network" in msg and "\n" not in msg
