"""Whether the files and folders a recipe names exist; checked before any model loads.

Value and combination rules live in the schema (``qlora_med.config.schema``); this is the only part of
the config layer that looks at the filesystem.
"""

from __future__ import annotations

from pathlib import Path

from qlora_med.config.problems import raise_problems
from qlora_med.config.schema import RecipeConfig, data_addresses


def validate_paths(recipe: RecipeConfig) -> None:
    """Every model folder, data file, image folder and ``init_from`` the recipe names exists.

    Raises one ConfigError listing every missing path.
    """
    problems = []
    model = recipe.model
    for key in ("name_or_path", "vision_tower", "llm"):
        value = getattr(model, key)
        if value is None or (key == "name_or_path" and model.tiny is not None):
            continue
        if not Path(value).is_dir():
            problems.append(
                f"model.{key}: directory '{value}' not found; download the model there first "
                "(this kit never fetches weights at run time)"
            )
    for stage in recipe.stages:
        for data_where, source in zip(data_addresses(stage), stage.data, strict=True):
            if not Path(source.path).is_file():
                problems.append(f"{data_where}.path: file '{source.path}' not found")
            if not Path(source.image_folder).is_dir():
                problems.append(f"{data_where}.image_folder: folder '{source.image_folder}' not found")
        if stage.init_from is not None and not (Path(stage.init_from) / "projector.safetensors").is_file():
            problems.append(
                f"stages.{stage.name}.init_from: '{stage.init_from}' has no projector.safetensors; "
                "point it at a finished stage's final/ folder (e.g. runs/x/instruct/final)"
            )
    raise_problems(problems)
