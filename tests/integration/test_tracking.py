"""`report_to: tensorboard` writes the training scalars where TensorBoard reads them; a missing tracker
package is a one-line error before anything loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qlora_med import cli

ROOT = Path(__file__).resolve().parents[2]


def _train(tiny_dir: Path, out: Path, tracker: str) -> int:
    return cli.main(
        [
            "train",
            str(ROOT / "recipes" / "demo_cpu.yaml"),
            "--stage",
            "align",
            f"model.name_or_path={tiny_dir}",
            f"output_dir={out}",
            f"report_to={tracker}",
            "stages.align.max_steps=3",
            "stages.align.logging_steps=1",
            "stages.align.save_steps=100",
            f"stages.align.data.path={ROOT / 'data/sample/alignment.json'}",
            f"stages.align.data.image_folder={ROOT / 'data/sample/images'}",
        ]
    )


def test_tensorboard_event_files_hold_the_logged_loss(tiny_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert _train(tiny_dir, tmp_path / "run", "tensorboard") == 0
    events = list((tmp_path / "run" / "align" / "runs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under <stage>/runs/"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [
        h["loss"]
        for h in json.loads((tmp_path / "run" / "align" / "final" / "log_history.json").read_text())
        if "loss" in h
    ]
    scalars = [e.value for e in acc.Scalars("train/loss")]
    assert len(scalars) == len(logged) == 3
    assert scalars == pytest.approx(logged, rel=1e-6)


def test_missing_tracker_package_is_one_clear_line(tiny_dir, tmp_path, monkeypatch, caplog):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    assert _train(tiny_dir, tmp_path / "run", "wandb") == 1
    err = caplog.text
    assert "report_to: wandb needs the `wandb` package, which is not installed: `pip install wandb`" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "align").exists()
