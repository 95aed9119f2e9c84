"""The README's benchmark numbers are what the bench printed: every ``<!-- copy of PATH -->`` block equals its file,
``--readme`` refreshes exactly the blocks of the files a run wrote, and a README without such a block is refused in
one line before a long run starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_bench import fake, result_of

from qlora_med.bench import embed
from qlora_med.bench.suite import Run
from qlora_med.cli import main as cli_main
from qlora_med.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


def test_the_readme_copies_equal_the_committed_bench_outputs():
    copies = embed.blocks((ROOT / "README.md").read_text())
    assert "benchmarks/results/bench.md" in copies  # the performance table
    for path, body in copies.items():
        assert body.rstrip("\n") == (ROOT / path).read_text().rstrip("\n"), f"README's copy of {path} is stale"


def _readme(tmp_path: Path, *paths: str) -> Path:
    parts = ["# Title", "intro"] + [f"<!-- copy of {p} -->\nold {p}\n<!-- end of {p} -->\nafter {p}" for p in paths]
    readme = tmp_path / "README.md"
    readme.write_text("\n".join(parts) + "\n")
    return readme


def test_refresh_replaces_only_the_blocks_it_is_given(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "bench.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    readme = _readme(tmp_path, "out/bench.md", "other/compare.md")
    assert embed.refresh(readme, [tmp_path / "out" / "bench.md"]) == ["out/bench.md"]
    text = readme.read_text()
    assert embed.blocks(text) == {"out/bench.md": "| a | b |\n|---|---|\n| 1 | 2 |\n",
                                  "other/compare.md": "old other/compare.md\n"}  # fmt: skip
    assert text.startswith("# Title\nintro\n") and "after out/bench.md\n" in text and text.endswith("compare.md\n")
    assert embed.refresh(readme, [tmp_path / "out" / "bench.md"]) and readme.read_text() == text  # idempotent


def test_a_readme_without_the_block_is_one_line(tmp_path):
    readme = _readme(tmp_path, "elsewhere.md")
    with pytest.raises(ConfigError, match=r"no block to refresh; add '<!-- copy of out/bench.md -->'"):
        embed.check(readme, [tmp_path / "out" / "bench.md"])
    with pytest.raises(ConfigError, match="cannot read it"):
        embed.check(tmp_path / "missing.md", [tmp_path / "out" / "bench.md"])


def test_cli_refreshes_the_readme_or_refuses_before_running(monkeypatch, tmp_path, tiny_dir, caplog):
    runs = [Run(r, "instruct", v, fake(t, 1500)) for v, ts in (("baseline", (100, 110, 90)), ("kit", (300, 320, 280)))
            for r, t in zip((1, 2, 3), ts, strict=True)]  # fmt: skip
    calls = []
    monkeypatch.setattr("qlora_med.bench.suite.run_bench",
                        lambda spec, variants, threads: calls.append(1) or result_of(runs, tiny_dir))  # fmt: skip
    readme = _readme(tmp_path, "out/bench.md")
    assert cli_main(["bench", "--quick", "--out", str(tmp_path / "out"), "--no-csv", "--readme", str(readme)]) == 0
    copy = embed.blocks(readme.read_text())["out/bench.md"]
    assert copy.rstrip("\n") == (tmp_path / "out" / "bench.md").read_text().rstrip("\n")
    assert "| kit |" in readme.read_text() and calls == [1]
    elsewhere = tmp_path / "elsewhere"
    assert cli_main(["bench", "--quick", "--out", str(elsewhere), "--no-csv", "--readme", str(readme)]) == 1
    assert calls == [1] and not elsewhere.exists()  # refused before running anything
    assert "no block to refresh" in caplog.text
