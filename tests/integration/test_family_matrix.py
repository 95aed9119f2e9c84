"""The family matrix through the real CLI: for each family a tiny model built from config trains the two-stage
curriculum (loss falls in each stage, with the family's template), then eval vqa, a two-round chat, merge, export (GGUF and the LLaVA-Med layout:
their one-line refusal for the other families). Prints per-family step time and peak memory (``-s`` shows the table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_med.config.families import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
STEPS = ["stages.align.max_steps=6", "stages.instruct.max_steps=6", "stages.align.logging_steps=1",
         "stages.instruct.logging_steps=1", "stages.align.save_steps=100", "stages.instruct.save_steps=100"]
# The CLI in-process, then its own peak RSS: one line the test reads back.
RUNNER = ("import resource, sys; from qlora_med.cli import main; rc = main(sys.argv[1:]); "
          "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True); sys.exit(rc)")
MATRIX: dict[str, dict] = {}


def _cli(*args: str, timeout: int = 900, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, input=stdin)


def _peak_mib(proc: subprocess.CompletedProcess) -> float:
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PEAK_RSS_KB"))
    return int(line.split()[1]) / 1024


def _templates(family: str) -> list[str]:
    if family == "llava":
        return []  # the demo's own: plain, then mistral_instruct
    return ["stages.align.template=chat_template", "stages.instruct.template=chat_template"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trained(request, tmp_path_factory):
    family = request.param
    work = tmp_path_factory.mktemp(f"family-{family}")
    out = work / "run"
    proc = _cli("run", "recipes/demo_cpu.yaml", f"model.name_or_path={work / 'tiny'}", f"model.tiny.family={family}",
                f"output_dir={out}", *_templates(family), *STEPS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    MATRIX[family] = {"train_peak_mib": _peak_mib(proc)}
    return family, out, proc


def test_loss_falls_in_each_stage_with_the_family_template(trained):
    family, out, proc = trained
    for stage in ("align", "instruct"):
        info = json.loads((out / stage / "final" / "stage.json").read_text())
        history = json.loads((out / stage / "final" / "log_history.json").read_text())
        losses = [h["loss"] for h in history if "loss" in h]
        assert len(losses) >= 4 and min(losses[-2:]) < losses[0], (family, stage, losses)
        runtime = next(h for h in history if "train_runtime" in h)
        MATRIX[family][f"{stage}_s_per_step"] = runtime["train_runtime"] / info["steps"]
        MATRIX[family][f"{stage}_loss"] = f"{losses[0]:.2f} -> {losses[-1]:.2f}"
        assert info["template"] == ("chat_template" if family != "llava" else info["template"])
    assert f"images: {family}:" in proc.stderr  # the family and its tokens per image are logged


def test_eval_merge_and_export(trained, tmp_path):
    family, out, _ = trained
    vqa = _cli("eval", "vqa", "--model", str(out), "--data", "data/sample/vqa_test.json", "--image-folder",
               "data/sample/images", "--out", str(tmp_path / "pred.jsonl"), "--max-new-tokens", "4", "--limit", "4",
               "--no-progress")
    assert vqa.returncode == 0, vqa.stderr[-3000:]
    assert sum(1 for _ in (tmp_path / "pred.jsonl").open()) > 0
    merged = _cli("merge", str(out), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-3000:]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] in FAMILIES[family].model_types
    peft = _cli("export", str(out), "--format", "peft", "--out", str(tmp_path / "peft"))
    assert peft.returncode == 0, peft.stderr[-3000:]
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    if family == "llava":
        return  # GGUF and the LLaVA-Med layout: tests/integration/test_llama_cpp.py, tests/unit/artifacts
    for fmt in ("gguf", "llava-med"):
        refused = _cli("export", str(out), "--format", fmt, "--out", str(tmp_path / fmt))
        lines = [x for x in refused.stderr.splitlines() if "ERROR" in x]
        assert refused.returncode != 0 and len(lines) == 1 and family in lines[0], refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr and not (tmp_path / fmt).exists()


def test_chat_keeps_two_rounds(trained):
    family, out, _ = trained
    chat = _cli("chat", "--model", str(out), "--image", "data/sample/images/ihc.png", "--max-new-tokens", "4",
                stdin="what stain is used?\nwhere is it brown?\n/quit\n")
    assert chat.returncode == 0, chat.stderr[-3000:]
    replies = [line for line in chat.stdout.splitlines() if "model> " in line]
    assert len(replies) == 2, chat.stdout[-2000:]


def test_print_matrix():
    if not MATRIX:
        pytest.skip("no family ran")
    rows = ["| family | align loss | instruct loss | s/step (align, instruct) | peak RSS (MiB) |", "|---|---|---|---|---|"]
    for name, m in sorted(MATRIX.items()):
        rows.append(f"| {name} | {m.get('align_loss')} | {m.get('instruct_loss')} | "
                    f"{m.get('align_s_per_step', 0):.2f}, {m.get('instruct_s_per_step', 0):.2f} | {m['train_peak_mib']:.0f} |")
    print("\n" + "\n".join(rows))
