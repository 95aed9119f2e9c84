"""``benchmarks/gpu_check.py``'s logic on a tiny LLaVA on the CPU (``--tiny --cpu``), so it works when a GPU is there."""

from __future__ import annotations

import json

from qlora_med.bench.gpu_check import main, parse_pytest_summary


def test_pytest_summary_is_parsed():
    text = "....s\n==== 12 passed, 3 skipped, 1500 deselected in 45.20s ====\n"
    assert parse_pytest_summary(text) == {"passed": 12, "failed": 0, "skipped": 3, "error": 0, "deselected": 1500,
                                          "xfailed": 0}  # fmt: skip
    assert parse_pytest_summary("1 failed, 2 errors in 3s")["error"] == 2
    assert parse_pytest_summary("no tests ran")["passed"] == 0


def test_tiny_cpu_check_runs_every_step(tmp_path, capsys):
    assert main(["--tiny", "--cpu", "--skip-tests", "--in-process", "--steps", "1", "--seq", "64",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["model"]["params"] > 0 and report["cuda"] is False
    assert [r["recipe"] for r in report["recipes"]] == ["24gb", "16gb", "12gb"]
    for row in report["recipes"]:
        assert row["fits"] is True and row["micro_batch"] in (8, 4, 2) and row["lora_r"] == 64
        assert row["plan_alloc_gib_full_ce"] > row["plan_alloc_gib_fused_ce"] > 0
    kit, baseline = report["bench"]["kit"], report["bench"]["baseline"]
    assert kit["tokens_per_s"] > 0 and baseline["tokens_per_s"] > 0
    assert abs(kit["loss_first"] - baseline["loss_first"]) < 1e-3  # same model, same tokens
    assert kit["mean_length"] == 64  # every sample fills the context
    extrapolation = report["extrapolation"]
    assert set(extrapolation["stages"]) == {"align", "instruct"} and extrapolation["total_hours"] > 0
    assert len(extrapolation["assumptions"]) >= 3
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| 24gb | 24 GB | 8 x 2 |" in markdown and "8xA100 curriculum" in markdown
    assert markdown in capsys.readouterr().out
