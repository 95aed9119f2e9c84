"""The same recipe (global_batch_size 8, accumulation auto) on 1 process and on 2 (gloo DDP, CPU, torchrun)
makes the same global batch and trains the same model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# Each optimizer step sees the whole 8-record dataset (global batch 8), so the sample order, which
# the single- and multi-process samplers draw differently, cannot matter; dropout RNG differs per rank.
COMMON = ["stages.align.max_steps=4", "stages.align.save_steps=2", "stages.align.logging_steps=1",
          "stages.align.warmup_ratio=0", "lora.dropout=0", "stages.align.data.max_records=8"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(tiny_dir: Path, out: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    args = [*launcher, "-m", "qlora_med.cli", "train", "recipes/demo_cpu.yaml", "--stage", "align",
            f"model.name_or_path={tiny_dir}", f"output_dir={out}", *COMMON,
            "stages.align.per_device_batch_size=4", "stages.align.gradient_accumulation_steps=auto",
            "stages.align.global_batch_size=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_same_recipe_same_global_batch_on_one_and_two_processes(tiny_dir, tmp_path):
    single = _train(tiny_dir, tmp_path / "single", [sys.executable])
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={_free_port()}", "--master_addr=127.0.0.1"]
    ddp = _train(tiny_dir, tmp_path / "ddp", torchrun)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    def losses(out: Path) -> list[float]:
        history = json.loads((out / "align" / "final" / "log_history.json").read_text())
        return [h["loss"] for h in history if "loss" in h]

    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-3, (one, two)
    for run, world, accum in (("single", 1, 2), ("ddp", 2, 1)):
        info = json.loads((tmp_path / run / "align" / "final" / "stage.json").read_text())
        assert (info["world_size"], info["micro_batch"], info["gradient_accumulation_steps"]) == (world, 4, accum)
        assert info["global_batch"] == 8
    for file in ("adapter_model.safetensors", "projector.safetensors"):
        a, b = load_file(tmp_path / "single" / "align" / "final" / file), load_file(tmp_path / "ddp" / "align" / "final" / file)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-4, f"{file}: max abs diff {worst}"
    assert "[rank 1]" not in ddp.stderr or "INFO" not in ddp.stderr.split("[rank 1]")[1][:20]


def test_accelerate_cpu_launcher_with_several_processes_is_refused(tiny_dir, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: the kit says so instead of training alone."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = _train(tiny_dir, tmp_path / "run", launcher)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "its CPU launcher started only this one" in proc.stderr and "torchrun --nproc_per_node" in proc.stderr
    # accelerate's launcher then prints its own traceback for the child's exit status; ours has none
    assert "qlora_med/" not in proc.stderr.split("Traceback")[-1] and not (tmp_path / "run" / "align").exists()
