"""``qlora-med data check --tokenizer org/name``: a Hub model's tokenizer and configs only, never its weights."""

from __future__ import annotations

from pathlib import Path

from helpers.hub_env import fetched_files, folder_files, serve_hub
from helpers.hub_standin import HubModel

from qlora_med.cli import main as cli_main
from qlora_med.data.model_text import load_model_text

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "sample"


def test_tokenizer_of_a_hub_model_without_its_weights(tiny_dir, tmp_path, monkeypatch, capsys):
    with serve_hub(monkeypatch, tmp_path / "hf-cache") as hub:
        hub.state.models["org/tiny-llava"] = HubModel(folder_files(tiny_dir))
        text, local = load_model_text("org/tiny-llava"), load_model_text(str(tiny_dir))
        assert (
            text.image_tokens == 16
            and text.tokenizer("<image>\nA cell.")["input_ids"] == local.tokenizer("<image>\nA cell.")["input_ids"]
        )
        assert "model.safetensors" not in fetched_files(hub) and "tokenizer.json" in fetched_files(hub)
        code = cli_main(
            [
                "data",
                "check",
                str(SAMPLE / "alignment.json"),
                "--image-folder",
                str(SAMPLE / "images"),
                "--tokenizer",
                "org/tiny-llava@main",
            ]
        )
        assert code == 0 and "16 image tokens" in capsys.readouterr().out
