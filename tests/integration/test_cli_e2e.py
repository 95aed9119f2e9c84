"""The curriculum through the real CLI in subprocesses: loss falls, hand-off, resume after a kill."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

STEPS = ["stages.align.max_steps=8", "stages.instruct.max_steps=8", "stages.align.save_steps=4",
         "stages.instruct.save_steps=4", "stages.align.logging_steps=2", "stages.instruct.logging_steps=2"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "qlora_med.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _hash_dir(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file():
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def _run(tiny_dir: Path, out: Path) -> subprocess.CompletedProcess:
    args = _cli("run", "recipes/demo_cpu.yaml", f"model.name_or_path={tiny_dir}", f"output_dir={out}", *STEPS)
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def full_run(tiny_dir, tmp_path_factory):
    base_hash = _hash_dir(tiny_dir)
    out = tmp_path_factory.mktemp("e2e") / "full"
    proc = _run(tiny_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, base_hash


def _stage(out: Path, name: str) -> dict:
    return json.loads((out / name / "final" / "stage.json").read_text())


def test_loss_falls_in_each_stage_and_artefacts_exist(full_run):
    out, proc, _ = full_run
    for name in ("align", "instruct"):
        info = _stage(out, name)
        assert info["steps"] == 8
        assert info["loss_last"] < info["loss_first"] - 0.1, info
        final = out / name / "final"
        for file in ("adapter_model.safetensors", "projector.safetensors", "loss.png", "resolved_config.yaml",
                     "tokenizer_config.json", "processor_config.json"):
            assert (final / file).is_file(), file
    assert "instruct   loss" in proc.stderr and "artefacts:" in proc.stderr


def test_base_is_untouched_and_never_copied(full_run, tiny_dir):
    out, _, base_hash = full_run
    assert _hash_dir(tiny_dir) == base_hash
    for name in ("align", "instruct"):
        for ckpt in [out / name / "final", *sorted((out / name).glob("checkpoint-*"))]:
            keys = set(load_file(ckpt / "adapter_model.safetensors")) | set(load_file(ckpt / "projector.safetensors"))
            assert keys and all("lora_" in k or k.startswith("model.multi_modal_projector.linear_") for k in keys), ckpt
            assert not list(ckpt.glob("model*.safetensors"))


def test_stage_two_starts_from_stage_one(full_run, tiny_dir):
    out, proc, _ = full_run
    align, instruct = out / "align" / "final", out / "instruct" / "final"
    assert _stage(out, "instruct")["previous_stage"] == str(align)
    assert f"continuing LoRA adapters from {align}" in proc.stderr
    assert f"loaded projector from {align}" in proc.stderr
    base = load_file(next(tiny_dir.glob("model*.safetensors")))
    p1, p2 = load_file(align / "projector.safetensors"), load_file(instruct / "projector.safetensors")
    a1, a2 = load_file(align / "adapter_model.safetensors"), load_file(instruct / "adapter_model.safetensors")
    for key, value in p1.items():
        assert not torch.equal(value, base[key.removeprefix("model.")])  # stage 1 trained it (the base's own key)
        assert not torch.equal(value, p2[key])  # stage 2 kept training it
    lora_b = [k for k in a1 if "lora_B" in k]
    assert lora_b and all(a1[k].abs().max() > 0 for k in lora_b)  # B starts at zero: it was trained
    assert any(not torch.equal(a1[k], a2[k]) for k in a1)
    # the stage-2 starting point is stage 1's projector (the runner's hand-off mechanism)
    from qlora_med.config.schema import LoraConfig, ModelConfig
    from qlora_med.config.stages import TrainSpec
    from qlora_med.model.load import load_model
    from qlora_med.train.trainable import setup_trainable

    model, _ = load_model(ModelConfig(name_or_path=str(tiny_dir)), tiny_dir, torch.float32)
    model = setup_trainable(model, TrainSpec(), LoraConfig(), align, False)
    live = model.base_model.model.model.multi_modal_projector.state_dict()
    assert all(torch.equal(live[k.removeprefix("model.multi_modal_projector.")], p1[k]) for k in p1)


def test_rerun_skips_finished_stages(full_run, tiny_dir):
    out, _, _ = full_run
    proc = _run(tiny_dir, out)
    assert proc.returncode == 0
    assert "stage align already finished" in proc.stderr and "stage instruct already finished" in proc.stderr


def test_killed_run_resumes_to_the_same_weights(full_run, tiny_dir, tmp_path):
    reference, _, _ = full_run
    out = tmp_path / "interrupted"
    args = _cli("run", "recipes/demo_cpu.yaml", f"model.name_or_path={tiny_dir}", f"output_dir={out}", *STEPS)
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "instruct" / "checkpoint-4" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (out / "instruct" / "final").exists(), "the kill must land mid-stage"

    resumed = _run(tiny_dir, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage align already finished" in resumed.stderr
    assert "resuming from" in resumed.stderr and "checkpoint-" in resumed.stderr
    for file in ("adapter_model.safetensors", "projector.safetensors"):
        ref = load_file(reference / "instruct" / "final" / file)
        got = load_file(out / "instruct" / "final" / file)
        assert ref.keys() == got.keys()
        worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
        assert worst <= 1e-5, f"{file}: max abs diff {worst}"
