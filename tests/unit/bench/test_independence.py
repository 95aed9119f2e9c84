"""The bench's baseline and TRL reference share no code with the kit: their imports, parsed."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "qlora_med" / "bench"
THIRD_PARTY = {"torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "PIL"}


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at module level or inside functions."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import (would be kit code)"
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("name", ["baseline.py", "trl_reference.py"])
def test_references_import_nothing_from_the_kit(name):
    roots = imported_roots(BENCH / name)
    assert "qlora_med" not in roots and "kernels" not in roots
    # the standard library, the libraries a user installs, and the shared measuring stick
    assert roots <= THIRD_PARTY | set(sys.stdlib_module_names) | {"__future__", "meter"}, roots
    assert "meter" in roots


def test_the_measuring_stick_is_standalone():
    roots = imported_roots(BENCH / "meter.py")
    assert roots <= {"torch", "__future__"} | set(sys.stdlib_module_names), roots


def test_references_write_their_own_training_logic():
    source = (BENCH / "baseline.py").read_text()
    for own in ("SKIP_MODULES =", "LORA_TARGETS =", "def encode(", "def collate(", "def shifted_cross_entropy("):
        assert own in source
    assert "target_modules=\"all-linear\"" in (BENCH / "trl_reference.py").read_text()
