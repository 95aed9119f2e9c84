"""What kind of model a folder holds, from its ``config.json`` alone, before anything loads.

Pure: :func:`kind_of` reads a config dict, :func:`read_kind` a ``config.json`` file (or the folder holding it);
both return a :class:`ModelKind` or raise one ConfigError line naming the folder, the ``model_type`` found and
the supported ones. What a recipe key may hold (its ``role``):

- ``llava`` (``model.name_or_path``): a supported VLM family in the HF layout (:mod:`qlora_med.config.families`:
  ``llava``, ``llava_next``, ``qwen2_5_vl`` / ``qwen2_vl``, ``gemma3``), or LLaVA's original layout ``llava_mistral`` / ``llava_llama`` (e.g. microsoft/llava-med-v1.5-mistral-7b), which is
  recognised but needs converting to the HF layout before it loads;
- ``vision_tower`` (compose mode): a CLIP vision model (``clip`` or ``clip_vision_model``);
- ``llm`` (compose mode): any model with a ``config.json`` (``AutoModelForCausalLM`` decides at load time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qlora_med.config.families import ADD_A_FAMILY, BY_MODEL_TYPE, supported
from qlora_med.errors import ConfigError

Role = Literal["llava", "vision_tower", "llm"]
Layout = Literal["hf_llava", "original_llava", "clip_vision", "causal_lm"]

HF_LLAVA = {t: f"{f.title}, {f.hf_class}" for t, f in BY_MODEL_TYPE.items()}
ORIGINAL_LLAVA = {
    "llava_mistral": "original LLaVA layout with a Mistral LLM, converted to HF LLaVA once",
    "llava_llama": "original LLaVA layout with a Llama LLM, converted to HF LLaVA once",
}
CLIP_VISION = {"clip": "CLIP, its vision tower", "clip_vision_model": "CLIP vision model"}
SUPPORTED = {
    "llava": f"{supported()}, or the original LLaVA layout llava_mistral / llava_llama "
    f"(e.g. microsoft/llava-med-v1.5-mistral-7b); {ADD_A_FAMILY}",
    "vision_tower": "clip or clip_vision_model (a CLIP vision tower)",
    "llm": "any causal LM with a config.json",
}


@dataclass(frozen=True)
class ModelKind:
    """A model's ``model_type`` and what the kit makes of it."""

    model_type: str
    layout: Layout
    description: str

    @property
    def needs_conversion(self) -> bool:
        """LLaVA's original layout: converted to the HF layout before it loads."""
        return self.layout == "original_llava"

    def __str__(self) -> str:
        return f"{self.model_type} ({self.description})"


def kind_of(
    config: dict, *, role: Role = "llava", where: str = "model.name_or_path: 'config.json'"
) -> ModelKind:
    """The kind of the model a ``config.json`` dict describes, for ``role``; ConfigError when it cannot serve.

    ``where`` starts the error line (``model.llm: 'models/x'``).
    """
    model_type = config.get("model_type") if isinstance(config, dict) else None
    shown = model_type if isinstance(model_type, str) and model_type else None
    if role == "llava":
        if shown == "llava" and "mm_vision_tower" in config and "text_config" not in config:
            # LLaVA 1.5's own release (liuhaotian/llava-v1.5-7b) says `llava` too, in the original layout
            return ModelKind(shown, "original_llava", "original LLaVA layout (LLaVA 1.5), converted to HF LLaVA once")
        if shown in HF_LLAVA:
            return ModelKind(shown, "hf_llava", HF_LLAVA[shown])
        if shown in ORIGINAL_LLAVA:
            return ModelKind(shown, "original_llava", ORIGINAL_LLAVA[shown])
    elif role == "vision_tower":
        if shown in CLIP_VISION:
            return ModelKind(shown, "clip_vision", CLIP_VISION[shown])
    elif isinstance(config, dict):
        return ModelKind(shown or "unknown", "causal_lm", "causal LM for compose mode")
    found = f"model_type '{shown}'" if shown else "no model_type"
    raise ConfigError(
        f"{where} has {found} in its config.json, which is not supported here; supported: {SUPPORTED[role]}"
    )


def read_kind(path: Path | str, *, role: Role = "llava", where: str | None = None) -> ModelKind:
    """:func:`kind_of` the ``config.json`` at ``path`` (the file, or the model folder holding it)."""
    path = Path(path)
    config = path if path.name == "config.json" and path.is_file() else path / "config.json"
    where = where or f"'{path}'"
    if not config.is_file():
        raise ConfigError(
            f"{where} has no config.json, so it is not a Hugging Face model folder; point it at "
            "the folder holding config.json and the weights, or name the model by its Hub id "
            "(org/name)"
        )
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{where}: its config.json cannot be read ({type(err).__name__}: {err})") from None
    return kind_of(data, role=role, where=where)
