"""Load what training produced (a run, a stage's ``final/``, a checkpoint, or a merged model) for use."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qlora_med.artifacts.adapter import PROJECTOR_FILE
from qlora_med.config.schema import RecipeConfig, StageConfig
from qlora_med.errors import QloraMedError

logger = logging.getLogger(__name__)


def resolve_trained(path: str | Path) -> Path:
    """A stage output dir for ``path``: a run dir means its last finished stage's ``final/``."""
    path = Path(path)
    if (path / "config.json").is_file() or (path / PROJECTOR_FILE).is_file():
        return path  # merged HF model, a final/ or a checkpoint-N/
    if (path / "final" / "stage.json").is_file():
        return path / "final"
    resolved = path / "resolved_config.yaml"
    if resolved.is_file():
        import yaml

        stages = [s["name"] for s in (yaml.safe_load(resolved.read_text()) or {}).get("stages", [])]
        for name in reversed(stages):
            if (path / name / "final" / "stage.json").is_file():
                return path / name / "final"
    raise QloraMedError(
        f"{path}: not a run directory, a stage 'final/' folder, a checkpoint or a merged model; "
        "pass e.g. runs/demo or runs/demo/instruct/final"
    )


def stage_info(final: Path) -> dict:
    """``stage.json`` of a final/ dir, or of the final/ beside a checkpoint-N/."""
    for candidate in (final / "stage.json", final.parent / "final" / "stage.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise QloraMedError(f"{final}: no stage.json (was this written by qlora-med?)")

logger = logging.getLogger(__name__)


def stage_chain(src: Path) -> list[dict]:
    """stage.json of this stage and every stage it started from, first stage first."""
    chain, seen = [], set()
    info: dict | None = stage_info(src)
    while info is not None and info.get("stage") not in seen:
        seen.add(info.get("stage"))
        chain.append(info)
        prev = info.get("previous_stage")
        info = stage_info(Path(prev)) if prev and (Path(prev) / "stage.json").is_file() else None
    return chain[::-1]


def recipe_value(src: Path, *keys: str, default=None):
    """A value from the resolved recipe saved with a stage (final/ or the stage dir of a checkpoint)."""
    import yaml

    for candidate in (src / "resolved_config.yaml", src.parent / "resolved_config.yaml"):
        if candidate.is_file():
            value = yaml.safe_load(candidate.read_text()) or {}
            for key in keys:
                value = value.get(key, {}) if isinstance(value, dict) else {}
            return default if value == {} else value
    return default

logger = logging.getLogger(__name__)


def stage_dir(recipe: RecipeConfig, stage: StageConfig) -> Path:
    return Path(recipe.output_dir) / stage.name


def previous_final(recipe: RecipeConfig, stage: StageConfig) -> Path | None:
    """Where a stage starts from: ``init_from``, else the previous stage's ``final/``, else the base."""
    if stage.init_from is not None:
        return Path(stage.init_from)
    index = [s.name for s in recipe.stages].index(stage.name)
    if index == 0:
        return None
    final = stage_dir(recipe, recipe.stages[index - 1]) / "final"
    if not final.is_dir():
        raise FileNotFoundError(
            f"stage '{stage.name}' starts from '{recipe.stages[index - 1].name}', which has no {final}; "
            "run the earlier stage first (qlora-med run runs all stages in order)"
        )
    return final
