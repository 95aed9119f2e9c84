"""Whether the files and folders a recipe names exist; checked before any model loads.

Value and combination rules live in the schema (``qlora_med.config.schema``); this is the only part of
the config layer that looks at the filesystem (with the two helpers it uses for models: what a model string
names, ``qlora_med.config.model_ref``, and what kind of model a config.json describes,
``qlora_med.config.model_kind``).
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qlora_med.config.families import BY_MODEL_TYPE, FAMILIES, Family, check_image_side, check_template
from qlora_med.config.model_kind import ModelKind, Role, read_kind
from qlora_med.config.model_ref import ModelRef, parse_model_ref
from qlora_med.config.problems import raise_problems
from qlora_med.config.schema import ModelConfig, RecipeConfig, data_addresses
from qlora_med.errors import ConfigError, QloraMedError

ROLES: dict[str, Role] = {"name_or_path": "llava", "vision_tower": "vision_tower", "llm": "llm"}
# (Hub model, recipe key) -> the path of its config.json, fetched: e.g. qlora_med.model.source.hub_file
HubConfig = Callable[[ModelRef, str], Path]


@dataclass(frozen=True)
class ModelSource:
    """One model a recipe names: where it is (``ref``) and, once its config.json was read, what it is."""

    key: str  # model.name_or_path, model.vision_tower or model.llm
    ref: ModelRef
    kind: ModelKind | None  # None: a Hub model whose config.json was not fetched
    tiny: str | None = None  # the family built from model.tiny into ref.path

    @property
    def family(self) -> Family | None:
        """The VLM family (None: a compose-mode part, or a Hub model whose config.json was not read)."""
        if self.tiny is not None:
            return FAMILIES[self.tiny]
        if self.kind is None or self.kind.layout not in ("hf_llava", "original_llava"):
            return None
        return FAMILIES["llava"] if self.kind.needs_conversion else BY_MODEL_TYPE[self.kind.model_type]

    def __str__(self) -> str:
        where = f"Hub model {self.ref}" if self.ref.repo_id is not None else f"folder '{self.ref}'"
        if self.tiny is not None:
            family = FAMILIES[self.tiny]
            return f"{self.key}: {where}: tiny model built from model.tiny (family {family.name}, {family.hf_class})"
        family = f"; family {self.family.name}" if self.family is not None else ""
        return (f"{self.key}: {where}: "
                f"{self.kind or 'kind read from its config.json before the weights download'}{family}")


def recipe_family(recipe: RecipeConfig, sources: list[ModelSource]) -> Family | None:
    """The family the recipe trains: compose mode builds a LLaVA; None while a Hub config.json is unread."""
    if recipe.model.vision_tower is not None:
        return FAMILIES["llava"]
    return next((s.family for s in sources if s.key == "model.name_or_path"), None)


def family_problems(recipe: RecipeConfig, family: Family | None) -> list[str]:
    """Stage templates and ``model.image_size`` that do not suit the family."""
    if family is None:
        return []
    problems = [check_template(family, stage.template, f"stages.{stage.name}") for stage in recipe.stages]
    problems.append(check_image_side(family, recipe.model.image_size))
    return [p for p in problems if p]


def validate_paths(recipe: RecipeConfig, hub_config: HubConfig | None = None) -> list[ModelSource]:
    """Every model, data file, image folder and ``init_from`` the recipe names exists; returns its models.

    A model is a local folder with a supported config.json (:func:`model_sources`) or a Hub id, whose
    config.json is checked too when ``hub_config`` fetches it. Raises one ConfigError listing every problem.
    """
    sources, problems = model_sources(recipe.model, hub_config)
    problems += family_problems(recipe, recipe_family(recipe, sources))
    for stage in recipe.stages:
        for data_where, source in zip(data_addresses(stage), stage.data, strict=True):
            problems += data_source_problems(source, data_where)
        if stage.init_from is not None and not (Path(stage.init_from) / "projector.safetensors").is_file():
            problems.append(
                f"stages.{stage.name}.init_from: '{stage.init_from}' has no projector.safetensors; "
                "point it at a finished stage's final/ folder (e.g. runs/x/instruct/final)"
            )
    raise_problems(problems)
    return sources


def model_sources(
    model: ModelConfig, hub_config: HubConfig | None = None
) -> tuple[list[ModelSource], list[str]]:
    """The models ``model:`` names and the problems found with them (one line each).

    A local path that exists wins; else the string must be a Hub id ``org/name[@revision]``
    (``qlora_med.config.model_ref``). A local folder's config.json must describe a model for its key
    (``qlora_med.config.model_kind``); so must a Hub model's when ``hub_config`` fetches it (else it is
    checked before its weights download).
    """
    sources, problems = [], []
    for name, role in ROLES.items():
        value, key = getattr(model, name), f"model.{name}"
        if value is None:
            continue
        if name == "name_or_path" and model.tiny is not None:
            sources.append(ModelSource(key, ModelRef(path=Path(value)), None, tiny=model.tiny.family))
            continue
        try:
            ref = parse_model_ref(value, key=key, revision=model.revision if name == "name_or_path" else None)
            if ref.path is not None and not ref.path.is_dir():
                raise ConfigError(
                    f"{key}: '{value}' is a file; point it at the model folder (with config.json)"
                )
            if ref.path is not None:
                kind = read_kind(ref.path, role=role, where=f"{key}: '{value}'")
            elif hub_config is not None:
                kind = read_kind(hub_config(ref, key), role=role, where=f"{key}: Hub model '{ref}'")
            else:
                kind = None
        except QloraMedError as err:
            problems.append(str(err))
            continue
        sources.append(ModelSource(key, ref, kind))
    return sources, problems


def is_table_path(path: str) -> bool:
    """Whether a data ``path`` names parquet (a ``.parquet`` file, a glob, a folder) rather than JSON/JSONL."""
    return path.lower().endswith(".parquet") or glob.has_magic(path) or Path(path).is_dir()


def parquet_files(path: str) -> list[Path]:
    """The parquet files a ``.parquet`` path, a glob or a folder (recursively) names, sorted; [] if none."""
    if Path(path).is_dir():
        return sorted(p for p in Path(path).rglob("*.parquet") if p.is_file())
    if glob.has_magic(path):
        return sorted(Path(p) for p in glob.glob(path, recursive=True) if p.endswith(".parquet") and Path(p).is_file())
    return [Path(path)] if Path(path).is_file() else []


def data_source_problems(source, where: str) -> list[str]:
    """The files and folders one data source (``DataConfig``) names that do not exist.

    A Hub dataset (``hf``) is looked up only when the stage's data is built (it may need the network).
    """
    problems = []
    if source.path is not None and is_table_path(source.path):
        if not parquet_files(source.path):
            what = ("folder '{}' has no .parquet file" if Path(source.path).is_dir() else
                    "no .parquet file matches '{}'" if glob.has_magic(source.path) else "file '{}' not found")
            problems.append(f"{where}.path: {what.format(source.path)}")
    elif source.path is not None:
        if not Path(source.path).is_file():
            problems.append(f"{where}.path: file '{source.path}' not found")
        if source.image_folder is None and not source.path.lower().endswith((".json", ".jsonl")):
            problems.append(f"{where}.image_folder: required for a JSON/JSONL source (the folder its "
                            "records' `image` paths are relative to); parquet paths end in .parquet")
    if source.image_folder is not None and not Path(source.image_folder).is_dir():
        problems.append(f"{where}.image_folder: folder '{source.image_folder}' not found")
    return problems
