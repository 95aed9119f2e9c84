"""``qlora-med bench --compare``: a re-run is checked against the earlier run's min-max per quantity; machine drift
moves absolute tokens/s but not the paired ratios; a bad earlier file is one line and exit 1."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_bench import fake, result_of

from qlora_med.bench import rerun
from qlora_med.bench.report import summarise, to_json
from qlora_med.bench.suite import Run
from qlora_med.cli import main as cli_main

BASE, KIT = (100, 120, 80), (300, 330, 250)


def report_of(tiny_dir, speed: float = 1.0, rss: float = 1500) -> dict:
    """A bench.json with every round ``speed`` times faster (the machine, not the code: its matmul peak too)."""
    runs = [Run(r, "instruct", "baseline", fake(t * speed, 2 * rss)) for r, t in zip((1, 2, 3), BASE, strict=True)]
    runs += [Run(r, "instruct", "kit", fake(t * speed, rss)) for r, t in zip((1, 2, 3), KIT, strict=True)]
    result = dataclasses.replace(result_of(runs, tiny_dir), peaks={"float32": {"flops": 1e11 * speed}})
    return to_json(result, summarise(result))


def test_the_same_run_reproduces_everything(tiny_dir):
    checks = rerun.compare(report_of(tiny_dir), report_of(tiny_dir))
    assert {(c.variant, c.quantity) for c in checks} == {
        (v, q) for v in ("baseline", "kit") for q in ("tok/s", "MFU", "peak RSS MiB")} | {("kit", "x base")}
    assert all(c.reproduced and c.change == 0 for c in checks)


def test_a_faster_machine_moves_tokens_per_second_not_the_ratios(tiny_dir):
    earlier, now = report_of(tiny_dir), report_of(tiny_dir, speed=1.5, rss=1540)
    checks = {(c.variant, c.quantity): c for c in rerun.compare(earlier, now)}
    assert not checks["kit", "tok/s"].reproduced and checks["kit", "tok/s"].change == pytest.approx(0.5)
    assert checks["kit", "x base"].reproduced and checks["kit", "x base"].now == pytest.approx(300 / 100)  # median
    assert checks["kit", "MFU"].reproduced and checks["kit", "MFU"].change == pytest.approx(0)  # peak moved alike
    assert checks["kit", "peak RSS MiB"].reproduced  # +2.7%: within the 5% allowed beside a min-max of 0
    assert not rerun.compare(earlier, report_of(tiny_dir, rss=1700))[-1].reproduced  # +13% is a change
    text = rerun.render(earlier, now, list(checks.values()), "old/bench.json")
    assert "| instruct | kit | tok/s | 300 (250-330) | 450 (375-495) | +50.0% | no | no |" in text
    assert not checks["kit", "tok/s"].overlaps and checks["baseline", "tok/s"].overlaps  # 80-120 and 120-180 touch
    assert "- tok/s: 0 of 2 medians inside the earlier run's min-max, 1 of 2 ranges overlap" in text
    assert "With 3 rounds and nothing changed, a median lands inside the other run's min-max 60%" in text
    assert "- x base: 1 of 1 medians" in text and "- MFU: 2 of 2 medians" in text and "(+50.0%): the machine's own speed" in text


def test_chance_rates_match_a_simulation():
    """The rates the report prints beside its counts: two runs of i.i.d. rounds, nothing changed."""
    gen = torch.Generator().manual_seed(0)
    for rounds in (3, 5):
        a, b = torch.randn(20000, rounds, generator=gen), torch.randn(20000, rounds, generator=gen)
        median = b.median(dim=1).values
        inside = ((a.min(1).values <= median) & (median <= a.max(1).values)).float().mean().item()
        overlap = (torch.maximum(a.min(1).values, b.min(1).values) <= torch.minimum(a.max(1).values, b.max(1).values))
        assert inside == pytest.approx(rerun.chance_inside(rounds), abs=0.015)
        assert overlap.float().mean().item() == pytest.approx(rerun.chance_overlap(rounds), abs=0.015)
    assert rerun.chance_inside(3) == pytest.approx(0.6) and rerun.chance_overlap(3) == pytest.approx(0.9)


def test_an_older_bench_json_without_ratios_gets_them_from_its_rounds(tiny_dir):
    earlier = report_of(tiny_dir)
    for entry in earlier["summary"]:
        del entry["x_base"]
    ratio = next(c for c in rerun.compare(earlier, report_of(tiny_dir)) if c.quantity == "x base")
    assert (ratio.low, ratio.high) == (pytest.approx(330 / 120), pytest.approx(250 / 80))  # 2.75 .. 3.12
    assert ratio.reproduced


def test_cli_compare_appends_the_check_and_refuses_a_bad_file(monkeypatch, tmp_path, tiny_dir, capsys, caplog):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(report_of(tiny_dir)))
    runs = [Run(r, "instruct", v, fake(t, 1500)) for v, ts in (("baseline", BASE), ("kit", KIT))
            for r, t in zip((1, 2, 3), ts, strict=True)]  # fmt: skip
    monkeypatch.setattr("qlora_med.bench.suite.run_bench", lambda spec, variants, threads: result_of(runs, tiny_dir))
    out = tmp_path / "out"
    assert cli_main(["bench", "--quick", "--out", str(out), "--no-csv", "--compare", str(earlier)]) == 0
    assert "### Re-run against" in capsys.readouterr().out
    assert "| instruct | kit | x base |" in (out / "bench.md").read_text()
    compared = (out / "compare.md").read_text()
    assert compared.startswith("### Re-run against") and "| instruct | kit | MFU |" in compared
    readme = tmp_path / "README.md"
    readme.write_text("<!-- copy of again/compare.md -->\n<!-- end of again/compare.md -->\n")
    monkeypatch.setattr("qlora_med.bench.suite.run_bench", lambda *a: pytest.fail("--against runs nothing"))
    assert cli_main(["bench", "--out", str(tmp_path / "again"), "--compare", str(earlier), "--against",
                     str(out / "bench.json"), "--readme", str(readme)]) == 0  # fmt: skip
    assert "| instruct | kit | MFU |" in readme.read_text() and not (tmp_path / "again" / "bench.md").exists()
    assert cli_main(["bench", "--against", str(out / "bench.json")]) == 1 and "needs --compare" in caplog.text
    (tmp_path / "broken.json").write_text("{not json")
    assert cli_main(["bench", "--quick", "--no-csv", "--compare", str(tmp_path / "broken.json")]) == 1
    assert "bench --compare" in caplog.text and "cannot read it as JSON" in caplog.text
    assert cli_main(["bench", "--quick", "--no-csv", "--compare", str(tmp_path / "missing.json")]) == 1
