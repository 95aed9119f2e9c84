"""A stage folder is reused only under the settings it was trained with: a changed recipe is refused by key
(finished or half-trained), bookkeeping changes are not, and --restart-changed keeps the old folder."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from qlora_med import cli

ROOT = Path(__file__).resolve().parents[2]
STEPS = [
    "stages.align.max_steps=2",
    "stages.instruct.max_steps=2",
    "stages.align.save_steps=1",
    "stages.instruct.save_steps=1",
    "stages.align.logging_steps=1",
    "stages.instruct.logging_steps=1",
]


def _run(tiny_dir: Path, out: Path, *extra: str) -> int:
    return cli.main(
        [
            "run",
            str(ROOT / "recipes" / "demo_cpu.yaml"),
            f"model.name_or_path={tiny_dir}",
            f"output_dir={out}",
            *STEPS,
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("changed") / "run"
    assert _run(tiny_dir, out) == 0
    return out


def test_finished_stage_under_other_settings_is_refused_by_key(trained, tiny_dir, caplog):
    record = (trained / "resolved_config.yaml").read_bytes()
    assert _run(tiny_dir, trained, "lora.r=4", "stages.instruct.learning_rate=1e-4") == 1
    assert (
        "stages.align: " in caplog.text
        and "was finished with other settings (lora.r: 16 -> 4)" in caplog.text
    )
    assert "use a new output_dir, or add --restart-changed" in caplog.text
    assert (trained / "resolved_config.yaml").read_bytes() == record  # never records untrained settings


def test_bookkeeping_changes_reuse_the_stages(trained, tiny_dir, caplog):
    with caplog.at_level(logging.INFO):
        assert _run(tiny_dir, trained, "stages.instruct.logging_steps=5", "report_to=none") == 0
    assert "stage instruct already finished" in caplog.text


def test_half_trained_stage_is_not_resumed_under_other_settings(trained, tiny_dir, tmp_path, caplog):
    run = tmp_path / "half"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "instruct" / "final")  # stopped after a checkpoint
    assert _run(tiny_dir, run, "stages.instruct.learning_rate=1e-4") == 1
    assert "was started with other settings (stages.instruct.learning_rate: 0.005 -> 0.0001)" in caplog.text


def test_restart_changed_keeps_the_old_folder_and_trains_again(trained, tiny_dir, tmp_path, caplog):
    run = tmp_path / "restart"
    shutil.copytree(trained, run)
    with caplog.at_level(logging.INFO):
        assert _run(tiny_dir, run, "stages.instruct.learning_rate=1e-4", "--restart-changed") == 0
    assert "stage align already finished" in caplog.text
    kept = [p.name for p in run.iterdir() if p.name.startswith("instruct.changed-")]
    assert len(kept) == 1 and (run / kept[0] / "final" / "stage.json").is_file()
    assert "learning_rate: 0.0001" in (run / "instruct" / "final" / "resolved_config.yaml").read_text()
