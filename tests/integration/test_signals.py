"""SIGTERM / Ctrl-C while training cost at most one step: a checkpoint is saved, the exit is non-zero with the
resume instruction, and the same command resumes from it. Unexpected failures are one line, -v for more."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_med import cli
from qlora_med.errors import describe_failure

ROOT = Path(__file__).resolve().parents[2]


def _cmd(tiny_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "qlora_med.cli", "train", "recipes/demo_cpu.yaml", "--stage", "align",
            f"model.name_or_path={tiny_dir}", f"output_dir={out}", "stages.align.max_steps=60",
            "stages.align.save_steps=1000", "stages.align.logging_steps=1"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tiny_dir, tmp_path):
    sig = signal.SIGTERM
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cmd(tiny_dir, out), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait until training really runs
        lines.append(line)
        if "'loss'" in line:
            break
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=300)
    text = "".join(lines) + rest
    assert proc.returncode == 1, text[-3000:]
    name = signal.Signals(sig).name
    assert f"stage align: stopped by {name} after step" in text and "run the same command to resume" in text
    assert "Traceback" not in text
    checkpoints = sorted(out.glob("align/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 1 and (checkpoints[0] / "COMPLETE").is_file() and not (out / "align" / "final").exists()
    step = int(checkpoints[0].name.split("-")[1])
    assert 0 < step < 60
    done = subprocess.run(_cmd(tiny_dir, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {checkpoints[0]}" in done.stderr
    assert json.loads((out / "align" / "final" / "stage.json").read_text())["steps"] == 60


def test_ctrl_c_requests_save_and_stop_and_a_second_one_is_not_caught():
    from transformers import TrainerControl

    from qlora_med.train.signals import StopOnSignal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh CLI process
    stop, control = StopOnSignal(), TrainerControl()
    stop.on_train_begin(None, None, control)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # handled: no KeyboardInterrupt
        assert stop.received == "SIGINT"
        stop.on_step_end(None, None, control)
        assert control.should_save and control.should_training_stop
        with pytest.raises(KeyboardInterrupt):  # the second one falls through to Python's default
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.on_train_end(None, None, control)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, before)


def test_unexpected_failure_is_one_line_and_verbose_gives_the_traceback(monkeypatch, caplog):
    import qlora_med.commands.validate as validate

    def boom(args):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(validate, "main", boom)
    assert cli.main(["validate", "recipes/demo_cpu.yaml"]) == 1
    assert "could not write a file" in caplog.text and "the disk is probably full" in caplog.text
    assert "Traceback" not in caplog.text
    caplog.clear()
    assert cli.main(["-v", "validate", "recipes/demo_cpu.yaml"]) == 1
    assert "Traceback" in caplog.text


def test_os_errors_are_named():
    full = OSError(errno.ENOSPC, "No space left on device", "runs/x/align/checkpoint-4/optimizer.pt")
    assert describe_failure(full).startswith("no space left on device writing runs/x/align/checkpoint-4/optimizer.pt")
    denied = PermissionError(errno.EACCES, "Permission denied", "/runs")
    assert describe_failure(denied) == "Permission denied: /runs: choose a writable output folder or fix its permissions"
    assert describe_failure(ValueError("bad")) == "ValueError: bad (run with -v for the traceback)"


def test_handlers_come_back_after_a_retry_and_after_a_crash():
    """The OOM fallback begins training twice on one callback; a crash never reaches train end: either way the
    process's own SIGINT handler is back afterwards."""
    from transformers import TrainerControl

    from qlora_med.train.signals import StopOnSignal

    def mine(signum, frame):
        return None

    before = signal.signal(signal.SIGINT, mine)
    try:
        stop, control = StopOnSignal(), TrainerControl()
        stop.on_train_begin(None, None, control)
        stop.on_train_begin(None, None, control)  # the retry
        assert signal.getsignal(signal.SIGINT) == stop._handle
        stop.on_train_end(None, None, control)
        assert signal.getsignal(signal.SIGINT) is mine
        crashed = StopOnSignal()
        crashed.on_train_begin(None, None, control)
        crashed.restore()  # what the runner does when training raised
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, before)
