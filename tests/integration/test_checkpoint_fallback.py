"""A complete-marked checkpoint damaged on disk is set aside by name and the run resumes from the older one."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from qlora_med import cli

ROOT = Path(__file__).resolve().parents[2]


def _train(tiny_dir: Path, out: Path) -> int:
    return cli.main(
        [
            "train",
            str(ROOT / "recipes" / "demo_cpu.yaml"),
            "--stage",
            "align",
            f"model.name_or_path={tiny_dir}",
            f"output_dir={out}",
            "stages.align.max_steps=4",
            "stages.align.save_steps=2",
            "stages.align.logging_steps=1",
            f"stages.align.data.path={ROOT / 'data/sample/alignment.json'}",
            f"stages.align.data.image_folder={ROOT / 'data/sample/images'}",
        ]
    )


def test_truncated_newest_checkpoint_falls_back_to_the_older_one(tiny_dir, tmp_path, caplog):
    out = tmp_path / "run"
    assert _train(tiny_dir, out) == 0
    stage = out / "align"
    shutil.rmtree(stage / "final")  # as if the run had stopped after its last checkpoint
    assert sorted(p.name for p in stage.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    adapter = stage / "checkpoint-4" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    with caplog.at_level(logging.INFO):
        assert _train(tiny_dir, out) == 0
    assert "checkpoint-4 is marked complete but adapter_model.safetensors is 100 bytes" in caplog.text
    assert f"resuming from {stage / 'checkpoint-2'}" in caplog.text
    assert (stage / "checkpoint-4.bad").is_dir() and (stage / "final" / "stage.json").is_file()
