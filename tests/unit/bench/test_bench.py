"""``qlora-med bench``: its batches, its table and CSV, its argument checks; the smoke run is ``slow``."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_med.bench.suite import (
    SAMPLE_DIR,
    BenchSpec,
    Result,
    _token_pool,
    append_csv,
    format_table,
    make_batches,
    table,
)
from qlora_med.cli import main as cli_main
from qlora_med.config.schema import TinyModelConfig

ROOT = Path(__file__).resolve().parents[3]
SPEC = BenchSpec(model=TinyModelConfig(), model_name="tiny", batch_size=4, max_length=300, steps=3, warmup=1)


def test_batches_are_deterministic_long_tailed_and_capped(processor):
    tok = processor.tokenizer
    image = tok.convert_tokens_to_ids("<image>")
    batches = make_batches(SPEC, tok, image, tok.pad_token_id)
    again = make_batches(SPEC, tok, image, tok.pad_token_id)
    assert len(batches) == SPEC.warmup + SPEC.steps
    for b, c in zip(batches, again, strict=True):
        assert all(torch.equal(b[k], c[k]) for k in b)
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches])
    assert lengths.max() <= SPEC.max_length and lengths.min() > SPEC.image_tokens
    assert batches[SPEC.warmup]["attention_mask"][0].sum() == SPEC.max_length  # peak measured at max length
    assert lengths.float().std() > 20  # lengths vary: padding matters
    for b in batches:
        mask = b["attention_mask"].bool()
        assert ((b["input_ids"] == image).sum(1) == SPEC.image_tokens).all()
        assert (b["labels"][~mask] == -100).all() and (b["labels"][b["input_ids"] == image] == -100).all()
        assert (b["labels"] != -100).any(1).all()  # every sample has something to learn
        assert b["pixel_values"].shape == (SPEC.batch_size, 3, 56, 56)


def test_batch_text_comes_from_the_sample_data(processor):
    assert SAMPLE_DIR == ROOT / "data" / "sample" and any(SAMPLE_DIR.glob("*.json"))
    pool = _token_pool(processor.tokenizer)
    assert pool != list(range(1000, 30000))  # not the fallback for a missing data/sample
    assert "image" in processor.tokenizer.decode(pool[:2000]).lower()


def result(name: str, tok_s: float, mem: float) -> Result:
    return Result(
        name,
        f"{name} run",
        int(tok_s * 10),
        10.0,
        mem,
        mem + 500,
        10.37,
        9999,
        {"steps": 3, "threads": 2, "load": 1.0, "cpu_seconds": 20.0},
    )


def test_table_ratios_and_csv(tmp_path):
    results = [result("baseline", 100, 2000), result("kit", 250, 800), result("no_padding_free", 125, 800)]
    rows = table(results)
    assert [r["x base"] for r in rows] == ["1.00", "2.50", "1.25"] and rows[0]["CPU use"] == "100%"
    assert [r["x base mem"] for r in rows] == ["1.00", "0.40", "0.40"]
    assert [r["vs kit CPU"] for r in rows] == ["", "", "0.50"] and rows[0]["s/step"] == "3.3"
    text = format_table(rows)
    assert text.splitlines()[0].startswith("variant") and "no_padding_free" in text
    path = tmp_path / "results" / "bench.csv"
    append_csv(path, dataclasses.replace(SPEC), results, rows)
    append_csv(path, dataclasses.replace(SPEC), results[:1], rows[:1])
    with path.open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == 4 and written[0]["variant"] == "baseline" and written[3]["variant"] == "baseline"
    assert {"date", "hardware", "threads", "torch", "transformers", "peft", "bitsandbytes", "trl"} <= set(
        written[0]
    )
    assert written[1]["tok/s"] == "250" and written[1]["max_length"] == "300"


def test_bench_rejects_unknown_variants_and_bad_sizes(caplog):
    assert cli_main(["bench", "--variants", "kit", "turbo", "--no-csv"]) == 1
    assert "unknown variants ['turbo']" in caplog.text
    assert cli_main(["bench", "--steps", "0", "--no-csv"]) == 1
    assert "must be positive" in caplog.text


@pytest.mark.slow
def test_bench_quick_smoke_through_the_cli(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    csv_path = tmp_path / "bench.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_med.cli", "bench", "--quick", "--csv", str(csv_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline" in proc.stdout and "kit" in proc.stdout
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["variant"] for r in rows] == ["baseline", "kit"]
    assert abs(float(rows[0]["loss@1"]) - float(rows[1]["loss@1"])) < 1e-3  # the same first step
