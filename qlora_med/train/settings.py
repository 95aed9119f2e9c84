"""Which recipe settings shape a stage's weights, and refusing to reuse a stage folder trained with others.

A stage folder records the recipe it was trained with (``<output_dir>/<stage>/resolved_config.yaml``,
written when the stage starts, again in ``final/``). Skipping a finished stage or resuming an unfinished
one is allowed only when every weight-shaping setting is unchanged; otherwise a ConfigError names each
differing key and the two ways out (a new ``output_dir``, or ``--restart-changed``, which sets the old
folder aside and trains the stage again). Settings that only change bookkeeping or speed are not compared:
:data:`OPERATIONAL`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml

from qlora_med.config.loader import recipe_to_dict
from qlora_med.config.schema import RecipeConfig, StageConfig
from qlora_med.errors import ConfigError

logger = logging.getLogger(__name__)

RECORD = "resolved_config.yaml"
# dotted keys (stage keys without the "stages.<name>." prefix) that never change the trained weights
OPERATIONAL = frozenset({
    "output_dir", "report_to", "kernels", "model.cache_dir", "model.attn_implementation",
    "save_steps", "save_total_limit", "logging_steps", "dataloader_workers",
})


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _operational(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "[") for k in OPERATIONAL)


def weight_settings(recipe: dict[str, Any], stage_name: str) -> dict[str, Any]:
    """Dotted key -> value of every setting of a (saved or current) recipe that shapes ``stage_name``'s weights."""
    stage = next((s for s in recipe.get("stages") or [] if s.get("name") == stage_name), None)
    if stage is None:
        return {}
    stage = dict(stage)
    if stage.get("global_batch_size") is not None:  # the promise is what counts, not how it is split
        stage.pop("per_device_batch_size", None)
        stage.pop("gradient_accumulation_steps", None)
    shared = {k: v for k, v in recipe.items() if k != "stages"}
    out = {k: v for k, v in _flatten(shared, "").items() if not _operational(k)}
    out.update({f"stages.{stage_name}.{k}": v for k, v in _flatten(stage, "").items() if not _operational(k)})
    return out


def changed_settings(folder: Path, recipe: RecipeConfig, stage: StageConfig) -> list[str]:
    """``key: trained -> now`` for each weight-shaping setting that differs from the folder's record
    (empty when equal, or when the folder has no record yet)."""
    record = folder / RECORD
    if not record.is_file():
        return []
    saved = weight_settings(yaml.safe_load(record.read_text()) or {}, stage.name)
    now = weight_settings(recipe_to_dict(recipe), stage.name)
    return [f"{key}: {saved.get(key, '(unset)')!r} -> {now.get(key, '(unset)')!r}"
            for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]


def set_aside(folder: Path) -> Path:
    """Rename a stage folder to ``<stage>.changed-<time>`` (kept, never deleted); returns the new path."""
    aside = folder.with_name(f"{folder.name}.changed-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.rename(aside)
    return aside


def check_unchanged(folder: Path, recipe: RecipeConfig, stage: StageConfig, state: str, restart: bool) -> bool:
    """Refuse (ConfigError) a ``state`` ("finished" / "started") stage folder trained with other settings, or,
    with ``restart``, move it aside and return True (the stage trains again). False: reuse it."""
    changes = changed_settings(folder, recipe, stage)
    if not changes:
        return False
    if not restart:
        listed = "; ".join(changes)
        raise ConfigError(
            f"stages.{stage.name}: {folder} was {state} with other settings ({listed}); use a new output_dir, "
            f"or add --restart-changed to set that folder aside and train the stage again"
        )
    aside = set_aside(folder)
    logger.warning("stage %s: settings changed (%s); its previous folder is kept as %s and the stage trains again",
                   stage.name, "; ".join(changes), aside)
    return True
