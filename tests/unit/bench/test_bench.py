"""``qlora-med bench``: interleaved schedule, medians and spreads, the table it prints and writes, its argument checks,
and one tiny real run of every worker kind (the baseline in its own process, as the bench runs it)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from qlora_med.bench import report
from qlora_med.bench.report import contention, markdown_table, render, rows, summarise, write_outputs
from qlora_med.bench.suite import (
    VARIANTS,
    BenchResult,
    BenchSpec,
    Run,
    run_bench,
    run_in_process,
    schedule,
)
from qlora_med.cli import main as cli_main
from qlora_med.config.schema import TinyModelConfig

BY_NAME = {v.name: v for v in VARIANTS}
LLM_LORA = "base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.default.weight"
PROJECTOR = "base_model.model.model.multi_modal_projector.linear_1.weight"


def fake(tok_s: float, peak: float, *, load: float = 0.5, trainable=None, labelled: int = 500) -> dict:
    """A worker's result: one warm-up batch and two measured ones of 1,000 real tokens in 2 / tok_s seconds."""
    batch = {"lengths": [600, 400], "padded": 1200, "labelled": labelled}
    return {"seconds": 2000 / tok_s, "cpu_seconds": 2000 / tok_s * 2, "step_seconds": [1000 / tok_s] * 2,
            "load": load, "threads": 2, "rss_after_imports_mib": 600.0, "peak_rss_mib": peak,
            "train_rss_mib": peak - 600, "losses": [10.4, 10.3, 10.2], "batches": [batch] * 3,
            "trainable": trainable or {LLM_LORA: 1000, PROJECTOR: 100}, "checkpointing": True,
            "quantized": ["model.language_model.layers.0.mlp.up_proj"]}  # fmt: skip


def result_of(runs: list[Run], tiny_dir: Path, variants=("baseline", "kit")) -> BenchResult:
    spec = BenchSpec(model=TinyModelConfig(), model_name="tiny", rounds=3, mixes=("instruct",))
    workload = {"instruct": {"samples": 8, "template": "mistral_instruct", "text_tokens": {"median": 360, "p90": 820,
                "max": 1500}, "rounds": {1: 4, 2: 4}, "truncated": 0}, "images": [{"width": 5, "height": 3}]}  # fmt: skip
    return BenchResult(spec, [BY_NAME[v] for v in variants], runs, {"float32": {"flops": 1e11}}, "float32", workload,
                       "test CPU", {"torch": "x"}, str(tiny_dir))  # fmt: skip


def test_schedule_interleaves_every_round():
    spec = BenchSpec(rounds=3, mixes=("align", "instruct"))
    names = [(r, m, v.name) for r, m, v in schedule(spec, [BY_NAME["baseline"], BY_NAME["kit"]])]
    assert names[:4] == [(1, "align", "baseline"), (1, "align", "kit"), (1, "instruct", "baseline"),
                         (1, "instruct", "kit")]  # fmt: skip
    assert len(names) == 12 and names[4][0] == 2


def test_medians_spreads_ratios_and_mfu(tiny_dir):
    runs = [Run(r, "instruct", "baseline", fake(t, 2000)) for r, t in ((1, 100), (2, 120), (3, 80))]
    runs += [Run(r, "instruct", "kit", fake(t, 1000 + 10 * r)) for r, t in ((1, 300), (2, 200), (3, 250))]
    summaries = summarise(result_of(runs, tiny_dir))
    table = rows(summaries)
    assert [r["tok/s"] for r in table] == ["100", "250"] and table[1]["min-max"] == "200-300"
    assert [r["x base"] for r in table] == ["1.00", "3.00"]  # paired by round: 300/100, 200/120, 250/80
    assert table[1]["x base min-max"] == "1.67-3.12" and table[0]["x base min-max"] == "1.00-1.00"
    assert table[1]["peak RSS MiB"] == "1,020" and table[1]["train MiB"] == "420"
    assert table[0]["loss on"] == "50% of tokens" and table[0]["padded/real"] == "1.20"
    assert table[0]["trains"] == "LoRA LLM + full projector" and table[0]["NF4"] == "LLM"
    assert summaries[1].mfu and summaries[1].hfu[0] > summaries[1].mfu[0] > 0  # checkpointing recomputes
    assert summaries[1].mfu[0] / summaries[0].mfu[0] == pytest.approx(300 / 100)  # same FLOPs per token
    assert contention(summaries) is None
    text = markdown_table(table)
    assert text.splitlines()[0].startswith("| variant | trains |") and text.count("\n") == 3


def test_contention_is_reported(tiny_dir):
    runs = [Run(1, "instruct", "baseline", fake(100, 2000, load=9.0))]
    text = render(result_of(runs, tiny_dir, ("baseline",)), summarise(result_of(runs, tiny_dir, ("baseline",))))
    assert "CONTENDED" in text and "### instruct" in text


def test_outputs_json_markdown_csv_and_plot(tmp_path, tiny_dir):
    runs = [Run(r, "instruct", v, fake(100 * r, 1500)) for r in (1, 2, 3) for v in ("baseline", "kit")]
    result = result_of(runs, tiny_dir)
    summaries = summarise(result)
    written = write_outputs(result, summaries, tmp_path / "out", tmp_path / "history.csv")
    write_outputs(result, summaries, tmp_path / "out", tmp_path / "history.csv")
    assert {p.name for p in written} == {"bench.md", "bench.json", "bench.png", "history.csv"}
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["summary"][1]["tok_s"] == [100, 200, 300] and len(data["runs"]) == 6
    assert data["table"] == rows(summaries)
    assert (tmp_path / "out" / "bench.md").read_text().strip() == render(result, summaries)
    history = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert len(history) == 4 and history[0]["variant"] == "baseline" and history[0]["mix"] == "instruct"


def test_bench_rejects_unknown_variants_and_bad_sizes(caplog):
    assert cli_main(["bench", "--variants", "kit", "turbo", "--no-csv"]) == 1
    assert "unknown variants ['turbo']" in caplog.text
    assert cli_main(["bench", "--steps", "0", "--no-csv"]) == 1
    assert cli_main(["bench", "--warmup", "0", "--no-csv"]) == 1
    assert "must be positive" in caplog.text


def test_cli_prints_the_table_it_writes(monkeypatch, tmp_path, tiny_dir, capsys):
    runs = [Run(1, "instruct", v, fake(100, 1500)) for v in ("baseline", "kit")]
    monkeypatch.setattr("qlora_med.bench.suite.run_bench", lambda spec, variants, threads: result_of(runs, tiny_dir))
    assert cli_main(["bench", "--quick", "--out", str(tmp_path), "--no-csv"]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "bench.md").read_text().strip() in printed


def test_tiny_real_run_of_every_worker(tmp_path, monkeypatch):
    """Every worker kind on a tiny model (in this process; the bench runs each in its own): same data, same first
    loss for the baseline and the kit (same model, same tokens); TRL trains and quantizes more, loss on every token."""
    spec = BenchSpec(model=TinyModelConfig(), model_name="tiny", batch_size=2, steps=1, warmup=1, rounds=1,
                     mixes=("instruct",), max_length=512, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    variants = [BY_NAME[n] for n in ("baseline", "trl", "kit")]
    result = run_bench(spec, variants, runner=run_in_process)
    by = {s.variant: s for s in summarise(result)}
    assert by["baseline"].first["losses"][0] == pytest.approx(by["kit"].first["losses"][0], abs=1e-3)
    assert by["kit"].padding == pytest.approx(1.0) and by["baseline"].padding > 1.0
    assert by["trl"].loss_share == pytest.approx(1.0) and by["baseline"].loss_share < 1.0
    assert by["trl"].nf4 == "LLM+CLIP+projector" and by["trl"].lora_on == "LoRA LLM+CLIP+projector"
    assert by["kit"].lora_on == by["baseline"].lora_on == "LoRA LLM + full projector"
    assert all(s.mfu and s.median("tok_s") > 0 for s in by.values())
    assert result.workload["instruct"]["samples"] == 4
    monkeypatch.setattr(report, "plot", lambda summaries, path: False)
    assert {p.name for p in write_outputs(result, summarise(result), tmp_path / "o", None)} == {"bench.md", "bench.json"}


def test_run_worker_protocol_and_its_refusals(tmp_path):
    """A worker is a script given a payload file; it writes its result file. A failure shows its stderr; a
    reference that loaded kit code is refused. (Fake scripts: no torch import, so this is fast.)"""
    from qlora_med.bench.suite import matmul_peaks, run_worker

    script = tmp_path / "fake_worker.py"
    script.write_text(
        "import json, sys\n"
        "p = json.load(open(sys.argv[1]))\n"
        "if p['mode'] == 'fail':\n    sys.exit('boom: ' + p['mix'])\n"
        "json.dump({'echo': p['mix'], 'kit_modules': ['qlora_med.model'] if p['mode'] == 'kit' else []},"
        " open(p['result'], 'w'))\n"
    )
    assert run_worker(script, {"mode": "ok", "mix": "align"}, 1, tmp_path)["echo"] == "align"
    with pytest.raises(RuntimeError, match="boom: instruct"):
        run_worker(script, {"mode": "fail", "mix": "instruct"}, 1, tmp_path)
    with pytest.raises(RuntimeError, match="must share no code with the kit"):
        run_worker(script, {"mode": "kit", "mix": "align"}, 1, tmp_path)
    peak = matmul_peaks(["float32"], 1, tmp_path, seconds=0.05, size=256)["float32"]  # meter.py run as a script, as the workers import it
    assert peak["flops"] > 1e8 and peak["threads"] == 1
