"""``qlora-med push`` against a local stand-in for the Hub API (127.0.0.1 only, see hub_standin.py)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from helpers.hub_standin import HubStandIn
from safetensors.torch import save_file

from qlora_med import cli
from qlora_med.artifacts.hub import HubError, PushOptions, push

TOKEN = "hf_test_token_do_not_print_0123456789"
CARD = "---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\nlicense: other\n---\n\n# tiny\n\nNot for clinical use.\n"


@pytest.fixture()
def folder(tmp_path) -> Path:
    out = tmp_path / "merged"
    out.mkdir()
    save_file({"w": torch.arange(50_000, dtype=torch.float32)}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (out / "README.md").write_text(CARD)
    (out / "qlora_med.json").write_text(json.dumps({"template": "mistral_instruct", "source": str(tmp_path / "gone")}))
    (out / ".cache").mkdir()
    (out / ".cache" / "ignored").write_text("local state")
    return out


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    with HubStandIn(TOKEN) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks plain LFS, not Xet
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def test_dry_run_lists_files_and_card_without_network(folder, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HF_TOKEN", raising=False)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert cli.main(["push", str(folder), "--repo-id", "me/tiny", "--dry-run"]) == 0
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # a dry run writes nothing
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "200.1 KB" in out and "config.json" in out and ".cache" not in out
    assert "# tiny" in out and "Not for clinical use." in out


def test_push_creates_repo_and_uploads_everything_in_one_commit(folder, hub, capsys, caplog):
    hub.state.lfs_threshold = 100_000  # model.safetensors goes through the LFS batch API
    caplog.set_level(logging.DEBUG)
    assert cli.main(["push", str(folder), "--repo-id", "me/tiny", "--private", "--revision", "v1"]) == 0
    assert hub.state.repos["me/tiny"]["visibility"] == "private" and "v1" in hub.state.branches["me/tiny"]
    assert len(hub.state.commits) == 1
    commit = hub.state.commits[0]
    assert commit["revision"] == "v1"
    assert set(commit["files"]) == {"README.md", "config.json", "qlora_med.json"}
    assert commit["files"]["README.md"].decode() == CARD
    oid = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert commit["lfs"] == {"model.safetensors": oid} and oid in hub.state.lfs_objects
    assert hub.state.validated[-1]["pipeline_tag"] == "image-text-to-text"  # the card's YAML went to validation
    out = capsys.readouterr().out
    assert "commit: http://127.0.0.1" in out and "revision: v1" in out
    assert {a for a in hub.state.auth_headers if a} == {f"Bearer {TOKEN}"}
    assert TOKEN not in out and TOKEN not in caplog.text
    assert not any(TOKEN in p.read_text(errors="ignore") for p in folder.rglob("*") if p.is_file())

    assert cli.main(["push", str(folder), "--repo-id", "me/tiny"]) == 0  # repo exists: reused
    assert len(hub.state.commits) == 2 and hub.state.commits[1]["revision"] == "main"


def test_bad_token_is_a_clear_error(folder, hub, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert cli.main(["push", str(folder), "--repo-id", "me/tiny"]) == 1
    assert "refused the token (HTTP 401)" in caplog.text and "HF_TOKEN" in caplog.text
    assert "hf_wrong" not in caplog.text and not hub.state.commits


def test_dropped_connection_is_retried_then_reported(folder, hub, caplog):
    hub.state.drop_next = 2
    result = push(folder, PushOptions("me/tiny", retries=3, backoff_s=0.01))
    assert hub.state.requests.count("POST /api/repos/create") == 3 and len(hub.state.commits) == 1
    assert "retrying" in caplog.text and result.commit_url.startswith(hub.url)

    hub.state.drop_next = 100
    with pytest.raises(HubError, match="failed 3 times"):
        push(folder, PushOptions("me/other", retries=2, backoff_s=0.01))
    assert len(hub.state.commits) == 1
