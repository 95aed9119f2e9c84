"""How a recipe is read: YAML plus ``dotted.key=value`` overrides, converted into the schema's dataclasses.

Unknown keys get the nearest valid key, wrong types and choices name the key; every problem of the
recipe (these and the schema's value and combination rules) is reported in one ConfigError. Also
writes the resolved config back out (:func:`save_resolved`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from qlora_med.config.problems import RecipeProblems, problems_of, raise_problems
from qlora_med.config.schema import RecipeConfig
from qlora_med.errors import ConfigError
from qlora_med.io import atomic_write_text


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value against a type hint, raising ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # try the member that matches the value's shape first, so its errors name the real key
        candidates = sorted((a for a in args if a is not type(None)),
                            key=lambda a: (typing.get_origin(a) is list) != isinstance(value, list))
        for arg in candidates:
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(err)
        if all(a is bool or typing.get_origin(a) is Literal for a in candidates):  # e.g. true | false | auto
            allowed = [c for a in candidates for c in (("true", "false") if a is bool else typing.get_args(a))]
            raise ConfigError(f"{where}: expected {', '.join(map(str, allowed[:-1]))} or {allowed[-1]}, got {value!r}")
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and "on" in choices and "off" in choices:
            value = "on" if value else "off"  # YAML 1.1 reads on/off (and yes/no) as booleans
        if value not in choices:
            near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"{where}: '{value}' is not one of {list(choices)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        def item_where(i: int, v: Any) -> str:  # stages are named by their name, like overrides
            return f"{where}.{v['name']}" if isinstance(v, dict) and "name" in v else f"{where}[{i}]"

        items, problems = [], []
        for i, v in enumerate(value):
            try:
                items.append(_convert(v, item_tp, item_where(i, v)))
            except ConfigError as err:
                problems += problems_of(err)
        raise_problems(problems)
        return items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "2e-4" as a string
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp in (str, float) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """The dataclass ``cls`` from ``data``; every bad key of it (and of its sections) in one error.

    The class's own rules (its ``__post_init__``) run only once all of its keys converted.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs, problems = {}, []
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {sorted(fields)}"
            problems.append(f"unknown key '{path}'{hint}")
            continue
        try:
            kwargs[key] = _convert(value, hints[key], path)
        except ConfigError as err:
            problems += problems_of(err)
    missing = [
        n
        for n, f in fields.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        prefix = f"{where}." if where else ""
        problems.append(f"missing required key(s): {', '.join(prefix + m for m in missing)}")
    raise_problems(problems)
    return cls(**kwargs)


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value``; list items (stages) are addressed by their ``name``."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like dotted.key=value")
    dotted, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override '{override}': the value is not valid YAML ({problem}); quote it "
                          f"('{dotted}=\"...\"') or fix the brackets") from None
    node: Any = data
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            match = [item for item in node if isinstance(item, dict) and item.get("name") == part]
            if not match:
                names = [item.get("name") for item in node if isinstance(item, dict)]
                raise ConfigError(f"override '{dotted}': no item named '{part}' (have {names})")
            node = match[0]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is not a mapping")
    node[parts[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Read a recipe YAML, apply overrides and return the validated config (no model is loaded)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    problems = []
    for override in overrides:
        try:
            _apply_override(data, override)
        except ConfigError as err:
            problems.append(str(err))
    try:
        recipe = _build(RecipeConfig, data, "")
    except ConfigError as err:
        raise RecipeProblems([*problems, *problems_of(err)], str(path)) from None
    raise_problems(problems, str(path))
    return recipe


def recipe_to_dict(recipe: Any) -> dict[str, Any]:
    """The resolved config as plain data (what is saved next to every output)."""
    return dataclasses.asdict(recipe)


def save_resolved(recipe: Any, path: Path) -> None:
    """Write the resolved config YAML atomically."""
    atomic_write_text(path, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
