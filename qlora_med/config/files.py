"""The recipe schema: typed dataclasses, loaded from YAML with ``dotted.key=value`` overrides.

Precedence: dataclass defaults < stage-kind presets (``qlora_med.stages``) < YAML < overrides.
Every key is documented once, in its field's ``metadata["help"]``; values are checked in
``__post_init__`` and cross-field rules in :func:`validate_recipe`, before any model loads.
"""

from __future__ import annotations

from pathlib import Path

from qlora_med.config.schema import RecipeConfig, data_addresses
from qlora_med.errors import ConfigError


def validate_paths(recipe: RecipeConfig) -> None:
    """Files and folders named by the recipe exist; combinations are possible. Runs before any load."""
    model = recipe.model
    for key in ("name_or_path", "vision_tower", "llm"):
        value = getattr(model, key)
        if value is None or (key == "name_or_path" and model.tiny is not None):
            continue
        if not Path(value).is_dir():
            raise ConfigError(
                f"model.{key}: directory '{value}' not found; download the model there first "
                "(this kit never fetches weights at run time)"
            )
    for stage in recipe.stages:
        where = f"stages.{stage.name}"
        for data_where, source in zip(data_addresses(stage), stage.data, strict=True):
            if not Path(source.path).is_file():
                raise ConfigError(f"{data_where}.path: file '{source.path}' not found")
            if not Path(source.image_folder).is_dir():
                raise ConfigError(f"{data_where}.image_folder: folder '{source.image_folder}' not found")
        if stage.init_from is not None and not (Path(stage.init_from) / "projector.safetensors").is_file():
            raise ConfigError(
                f"{where}.init_from: '{stage.init_from}' has no projector.safetensors; "
                "point it at a finished stage's final/ folder (e.g. runs/x/instruct/final)"
            )
        if stage.train.projector == "frozen" and stage.train.llm == "frozen":
            raise ConfigError(f"{where}.train: nothing to train (projector and llm both frozen)")
        if stage.template == "plain" and stage.kind != "align":
            raise ConfigError(
                f"{where}.template: 'plain' (image then caption) is for align stages; "
                "use mistral_instruct, vicuna_v1 or llava_med_v1"
            )
