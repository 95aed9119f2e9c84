"""The README's recipe table is generated from the recipe files, so its batch and optimizer columns cannot
drift from what the recipes train with. On a failure the message is the table to paste into README.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from qlora_med.config.schema import StageConfig

ROOT = Path(__file__).resolve().parents[2]
HEADER = "| recipe | stages | global batch | micro-batch × accumulation (per device) | optimizer | what |"
DEFAULTS = {f.name: f.default for f in dataclasses.fields(StageConfig)}


def _what(path: Path) -> str:
    """The recipe's first header line, without the leading '# '."""
    return path.read_text().splitlines()[0].removeprefix("#").strip()


def _get(stage: dict, key: str):
    return stage.get(key, DEFAULTS[key])


def _per_stage(stages: list[dict], fmt) -> str:
    values = [fmt(s) for s in stages]
    if len(set(values)) == 1:
        return values[0]
    return ", ".join(f"{s['name']} {v}" for s, v in zip(stages, values, strict=True))


def recipe_table() -> str:
    rows = [HEADER, "|---|---|---|---|---|---|"]
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        stages = yaml.safe_load(path.read_text())["stages"]
        batch = _per_stage(
            stages, lambda s: f"{_get(s, 'per_device_batch_size')} × {_get(s, 'gradient_accumulation_steps')}"
        )
        glob = _per_stage(
            stages,
            lambda s: (
                f"{_get(s, 'global_batch_size')} (any GPU count)"
                if _get(s, "global_batch_size")
                else "micro × accumulation × GPUs"
            ),
        )
        optim = _per_stage(stages, lambda s: f"`{_get(s, 'optim')}`")
        names = " → ".join(s["name"] for s in stages)
        rows.append(f"| `recipes/{path.name}` | {names} | {glob} | {batch} | {optim} | {_what(path)} |")
    return "\n".join(rows)


def test_readme_recipe_table_matches_the_recipes() -> None:
    readme = (ROOT / "README.md").read_text()
    assert HEADER in readme, "README.md has no recipe table"
    start = readme.index(HEADER)
    end = readme.find("\n\n", start)
    shown = readme[start : end if end != -1 else None].strip()
    want = recipe_table()
    assert shown == want, f"README.md's recipe table is out of date; replace it with:\n\n{want}\n"
