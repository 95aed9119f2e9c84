"""The package's layering: no import cycle, no upward import, no command importing another, and the CLI's
``--help`` and ``validate`` never import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "qlora_med"

# Lowest first. A module may import its own layer's modules and lower layers, never a higher one.
LAYERS = [
    {"errors", "io", "notices", "kernels", "__init__"},
    {"prompts"},
    {"config"},
    {"patches"},
    {"model"},
    {"data", "plan"},
    {"artifacts"},
    {"train"},
    {"eval", "bench"},
    {"serve"},
    {"commands", "cli"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(("qlora_med", *parts)).removesuffix(".__init__")] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        found[f"qlora_med.kernels.{path.stem}".removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """Every qlora_med module ``module`` imports, at the top or inside a function."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("qlora_med") and name != module and name != "qlora_med":
                found.add(name)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    assert part in LAYER_OF, f"{module}: subpackage '{part}' has no layer in tests/unit/test_layers.py LAYERS"
    return LAYER_OF[part]


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_upward_import():
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m, deps in GRAPH.items() for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_commands_import_no_other_command():
    shared = {"qlora_med.commands", "qlora_med.commands._options"}
    offenders = [f"{m} imports {d}" for m, deps in GRAPH.items() if m.startswith("qlora_med.commands.")
                 for d in deps if d.startswith("qlora_med.commands") and d not in shared]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("argv", [["--help"], ["validate", "recipes/demo_cpu.yaml"], ["validate", "--help"]])
def test_cli_help_and_validate_import_no_torch(argv):
    code = (
        "import sys\nfrom qlora_med.cli import main\n"
        f"try:\n    rc = main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules)\n"
        "print('HEAVY', heavy, 'RC', rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "HEAVY [] RC 0" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
