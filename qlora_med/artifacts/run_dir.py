"""The run folder: its layout, where a stage writes, and the one reader of what a run saved.

What ``qlora-med run`` writes (file names are the constants below)::

    <output_dir>/                        a run
    ├── resolved_config.yaml             the recipe, every stage resolved          RESOLVED_CONFIG
    └── <stage>/                         one per stage, in recipe order            stage_dir()
        ├── resolved_config.yaml
        ├── checkpoint-N/                while training: COMPLETE marker, adapter, projector,
        │                                optimizer / scheduler / RNG / trainer state
        └── final/                       a finished stage                          FINAL
            ├── adapter_model.safetensors    PEFT LoRA adapter (absent when the LLM is not LoRA-trained)
            ├── adapter_config.json
            ├── projector.safetensors        the trained projector
            ├── tokenizer / processor files
            ├── stage.json                   what trained on what: base_model, previous_stage, template,
            │                                losses, steps, hardware, ...               STAGE_JSON
            ├── log_history.json, loss.png
            └── resolved_config.yaml

``merge`` and ``export`` write a model folder with ``qlora_med.json`` (META_FILE: template, image
aspect, the source stage) instead. This module only reads JSON / YAML (no torch), so commands that
only look at a run stay cheap.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from qlora_med.config.schema import RecipeConfig, StageConfig
from qlora_med.errors import QloraMedError

RESOLVED_CONFIG = "resolved_config.yaml"
FINAL = "final"
STAGE_JSON = "stage.json"
LOG_HISTORY = "log_history.json"
LOSS_PLOT = "loss.png"
COMPLETE = "COMPLETE"  # written last into a checkpoint-N/ (qlora_med.train.checkpoints)
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PROJECTOR_FILE = "projector.safetensors"
META_FILE = "qlora_med.json"


def stage_dir(recipe: RecipeConfig, stage: StageConfig) -> Path:
    """``<output_dir>/<stage>``: the stage's checkpoints and its ``final/``."""
    return Path(recipe.output_dir) / stage.name


def previous_final(recipe: RecipeConfig, stage: StageConfig) -> Path | None:
    """Where a stage starts from: ``init_from``, else the previous stage's ``final/``, else the base."""
    if stage.init_from is not None:
        return Path(stage.init_from)
    index = [s.name for s in recipe.stages].index(stage.name)
    if index == 0:
        return None
    final = stage_dir(recipe, recipe.stages[index - 1]) / FINAL
    if not final.is_dir():
        raise QloraMedError(
            f"stage '{stage.name}' starts from '{recipe.stages[index - 1].name}', which has no {final}; "
            "run the earlier stage first (qlora-med run runs all stages in order)"
        )
    return final


def saved_recipe(path: Path) -> dict:
    """The resolved recipe saved in ``path`` (a run, a ``final/``) or its parent (the stage of a checkpoint-N/).

    Plain YAML data, ``{}`` when there is none.
    """
    for candidate in (path / RESOLVED_CONFIG, path.parent / RESOLVED_CONFIG):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text()) or {}
    return {}


def resolve_trained(path: str | Path) -> Path:
    """A stage output dir for ``path``: a run dir means its last finished stage's ``final/``."""
    path = Path(path)
    if (path / "config.json").is_file() or (path / PROJECTOR_FILE).is_file():
        return path  # merged HF model, a final/ or a checkpoint-N/
    if (path / FINAL / STAGE_JSON).is_file():
        return path / FINAL
    for name in reversed([s["name"] for s in saved_recipe(path).get("stages", [])]):
        if (path / name / FINAL / STAGE_JSON).is_file():
            return path / name / FINAL
    raise QloraMedError(
        f"{path}: not a run directory, a stage 'final/' folder, a checkpoint or a merged model; "
        "pass e.g. runs/demo or runs/demo/instruct/final"
    )


def stage_info(final: Path) -> dict:
    """``stage.json`` of a final/ dir, or of the final/ beside a checkpoint-N/."""
    for candidate in (final / STAGE_JSON, final.parent / FINAL / STAGE_JSON):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise QloraMedError(f"{final}: no {STAGE_JSON} (was this written by qlora-med?)")


def stage_chain(src: Path) -> list[dict]:
    """stage.json of this stage and every stage it started from, first stage first."""
    chain, seen = [], set()
    info: dict | None = stage_info(src)
    while info is not None and info.get("stage") not in seen:
        seen.add(info.get("stage"))
        chain.append(info)
        prev = info.get("previous_stage")
        info = stage_info(Path(prev)) if prev and (Path(prev) / STAGE_JSON).is_file() else None
    return chain[::-1]
