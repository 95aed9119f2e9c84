"""The planner's inputs from a recipe or a model config: model shape (``ModelShape``) and run settings (``RunSpec``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qlora_med.config.batch import stage_batch
from qlora_med.config.families import FAMILIES
from qlora_med.config.model_ref import parse_model_ref
from qlora_med.errors import ConfigError
from qlora_med.model.source import hub_file
from qlora_med.plan.estimate import (
    LORA_TARGETS,
    PRESETS,
    LLMShape,
    ModelShape,
    RunSpec,
    VisionShape,
    preset,
)

logger = logging.getLogger(__name__)
VISION_BY_NAME = {"clip-vit-large-patch14-336": PRESETS["llava-med-v1.5"].vision,
                  "clip-vit-large-patch14": VisionShape(24, 1024, 4096, 16, 224, 14)}


def shape_from_config_dict(cfg: dict, name: str = "config", image_side: int | None = None) -> ModelShape:
    """ModelShape from a HF ``config.json`` dict: a LlavaConfig (text_config + vision_config), LLaVA's original
    layout (the LLM's keys + ``mm_vision_tower``, a tower known by name), another family's config or a plain
    LLM. ``image_side`` (``model.image_size``) is the square side of the any-res and dynamic families (default:
    the family's)."""
    llm = _llm_shape(cfg.get("text_config", cfg))
    v = cfg.get("vision_config")
    if not v and cfg.get("mm_vision_tower"):  # llava_mistral / llava_llama: the tower only by name
        vision = VISION_BY_NAME.get(_name(cfg["mm_vision_tower"]).lower())
        if vision is None:
            logger.warning(
                "%s: vision tower %s is not a known one: planning the LLM only", name, cfg["mm_vision_tower"]
            )
            return ModelShape(name, llm)
        return ModelShape(
            name, llm, vision, "linear" if cfg.get("mm_projector_type") == "linear" else "mlp2x_gelu"
        )
    if not v:
        return ModelShape(name, llm)
    family = cfg.get("model_type")
    if family in ("qwen2_5_vl", "qwen2_vl"):  # dynamic resolution: planned at the family's square side
        side, merge = image_side or FAMILIES["qwen2_5_vl"].image_side, v.get("spatial_merge_size", 2)
        vision = VisionShape(v["depth"], v.get("embed_dim", v["hidden_size"]), v.get("intermediate_size", 4 * v["hidden_size"]),
                             v["num_heads"], side, v["patch_size"])  # fmt: skip
        return ModelShape(name, llm, vision, "patch_merger", vision.patches // merge**2)
    vision = _vision_shape(v)
    tokens, crops, projector = None, 1, "linear" if cfg.get("projector_type") == "linear" else "mlp2x_gelu"
    if family == "gemma3":  # one linear map after pooling
        tokens, projector = cfg.get("mm_tokens_per_image", 256), "linear"
    elif family == "llava_next":  # any-res at the largest square grid point: base image + its tiles + newlines
        side = image_side or max((h for h, w in cfg.get("image_grid_pinpoints", [[672, 672]]) if h == w), default=672)
        grid = side // vision.patch_size
        tokens = vision.patches + grid * grid + grid
        crops = (side // vision.image_size) ** 2 + 1
    return ModelShape(name, llm, vision, projector, tokens, crops)


def _llm_shape(text: dict) -> LLMShape:
    heads = text["num_attention_heads"]
    return LLMShape(
        text["num_hidden_layers"],
        text["hidden_size"],
        text["intermediate_size"],
        heads,
        text.get("num_key_value_heads") or heads,
        text["vocab_size"],
        text.get("head_dim"),
        bool(text.get("tie_word_embeddings", False)),
    )


def _vision_shape(v: dict) -> VisionShape:
    return VisionShape(
        v["num_hidden_layers"],
        v["hidden_size"],
        v["intermediate_size"],
        v["num_attention_heads"],
        v["image_size"],
        v["patch_size"],
    )


def _name(value: str) -> str:
    """A model folder's or Hub repo's own name, without org or ``@revision`` (what presets are known by)."""
    try:
        return parse_model_ref(value).name
    except ConfigError:
        return Path(value).name


def _is_preset(value: str) -> bool:
    try:
        preset(value)
    except ValueError:
        return False
    return True


def _local_config(value: str | None) -> dict | None:
    """The config.json of an existing local folder, else None."""
    config = Path(value or "").expanduser() / "config.json"
    return json.loads(config.read_text()) if value and config.is_file() else None


def _hub_config(value: str, key: str, revision: str | None = None) -> dict | None:
    """The config.json of the Hub model ``value`` names (only that file is fetched, through the HF cache;
    ``HF_HUB_OFFLINE=1``: the cache only); None when ``value`` is a local path or no Hub id."""
    if Path(value).expanduser().exists():
        return None
    try:
        ref = parse_model_ref(value, key=key, revision=revision)
    except ConfigError:
        return None
    return json.loads(hub_file(ref, key).read_text())


def _read_config(
    path: str | None, key: str = "model.name_or_path", revision: str | None = None
) -> dict | None:
    """The config.json of a local model folder, or of a Hub model unless ``path`` is a preset name (a preset
    needs no network); None when there is none."""
    if not path:
        return None
    local = _local_config(path)
    if local is not None or Path(path).expanduser().exists() or _is_preset(path):
        return local
    return _hub_config(path, key, revision)


def _part(value: str, key: str, by_name, from_config) -> tuple[object | None, bool]:
    """One compose-mode part's shape, and whether it was taken from its name: the local folder's config.json,
    else a known name (no network), else the Hub model's config.json; (None, False) when none of them."""
    cfg = _local_config(value)
    if cfg is not None:
        return from_config(cfg), False
    shape = by_name(value)
    if shape is not None:
        return shape, True
    cfg = _hub_config(value, key)
    return (from_config(cfg), False) if cfg is not None else (None, False)


def _llm_by_name(value: str) -> LLMShape | None:
    for name in (value.partition("@")[0], _name(value)):
        if _is_preset(name):
            return preset(name).llm
    return None


def shape_for_run(recipe: object, model_dir: Path | None = None) -> ModelShape:
    """The shape a launch plans with: ``model_dir``'s config.json (the resolved base model: no Hub request), else
    :func:`shape_from_recipe`."""
    if model_dir is None:
        return shape_from_recipe(recipe)
    side = getattr(recipe.model, "image_size", None)  # type: ignore[attr-defined]
    return shape_from_config_dict(json.loads((Path(model_dir) / "config.json").read_text()), Path(model_dir).name, side)


def shape_from_recipe(recipe: object) -> ModelShape:
    """Model shape of a ``RecipeConfig``: the tiny builder's sizes, ``model.name_or_path``'s config.json (a local
    folder's, or a Hub model's: that one file is fetched), the compose-mode ``model.vision_tower`` + ``model.llm``
    config.json files (or their names, when known presets), or a preset name."""
    m = recipe.model  # type: ignore[attr-defined]
    built = _local_config(m.name_or_path) if m.tiny is not None else None
    if built is not None:  # the tiny model as built (any family)
        qwen = built.get("model_type") in FAMILIES["qwen2_5_vl"].model_types
        side = m.image_size or (m.tiny.merged_side if qwen else None)  # tiny Qwen: as model.tiny builds it
        return shape_from_config_dict(built, name="tiny", image_side=side)
    if m.tiny is not None:  # qlora_med.model.build_tiny: CLIP MLP 4x hidden, vocab = tokenizer rounded up to 64
        if m.tiny.family != "llava":
            raise ConfigError(f"model.tiny.family: the tiny {m.tiny.family} model is planned from its config.json: "
                              f"run the recipe once (it builds {m.name_or_path}) or plan with --model PRESET")
        t = m.tiny
        return ModelShape("tiny", LLMShape(t.text_layers, t.text_hidden, t.text_intermediate, t.text_heads,
                                           t.text_kv_heads, 32064),
                          VisionShape(t.vision_layers, t.vision_hidden, 4 * t.vision_hidden, t.vision_heads,
                                      t.image_size, t.patch_size))
    if m.name_or_path is not None:
        revision = getattr(m, "revision", None)  # duck-typed: callers may pass a namespace without it
        cfg = _read_config(m.name_or_path, revision=revision)
        if cfg is not None:
            return shape_from_config_dict(cfg, name=_name(m.name_or_path), image_side=getattr(m, "image_size", None))
        try:
            return preset(m.name_or_path)
        except ValueError as err:
            raise ConfigError(f"model.name_or_path: no config.json in {m.name_or_path} and {err}") from None
    name = f"{_name(m.vision_tower)} + {_name(m.llm)}"
    vision, vision_named = _part(
        m.vision_tower,
        "model.vision_tower",
        lambda v: VISION_BY_NAME.get(_name(v).lower()),
        lambda c: _vision_shape(c.get("vision_config", c)),
    )
    llm, llm_named = _part(m.llm, "model.llm", _llm_by_name, lambda c: _llm_shape(c.get("text_config", c)))
    if vision is None or llm is None:
        missing = m.vision_tower if vision is None else m.llm
        raise ConfigError(
            f"model: no config.json in {missing}; download the model first or plan with --model PRESET"
        )
    if vision_named or llm_named:
        logger.warning("model not downloaded: shape of %s taken from the directory names", name)
    return ModelShape(name, llm, vision, m.projector_type)


def run_for_stage(recipe: object, stage: object, n_gpus: int = 1, device: str = "cuda") -> RunSpec:
    """RunSpec of one recipe stage as configured (batch, accumulation, length, optimizer, LoRA); the ``auto``
    settings planned the safe way (checkpointing on, batches padded): ``qlora-med plan`` and the runner decide
    them."""
    lora, model, st = recipe.lora, recipe.model, stage  # type: ignore[attr-defined]
    optim = st.optim  # type: ignore[attr-defined]
    optimizer = ("paged_" if "paged" in optim else "") + ("adamw_8bit" if "8bit" in optim else "adamw")
    dtype = model.compute_dtype if model.compute_dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    targets = tuple(
        t.removesuffix("_proj") for t in lora.target_modules if t.removesuffix("_proj") in LORA_TARGETS
    )
    micro, accum = st.per_device_batch_size, st.gradient_accumulation_steps
    if micro != "auto":  # fixed, or accumulation derived from global_batch_size for n_gpus
        batch = stage_batch(st, n_gpus)
        micro, accum = batch.micro_batch, batch.accumulation
    return RunSpec(
        micro_batch=micro, grad_accum=accum, seq_len=st.max_length,
        lora_rank=lora.r if st.train.llm == "lora" else 0, lora_targets=targets, lora_dropout=lora.dropout,
        optimizer="paged_adamw_32bit" if optimizer == "paged_adamw" else optimizer,
        grad_checkpointing=st.gradient_checkpointing is not False, compute_dtype=dtype, quantization=model.quantization,
        double_quant=model.double_quant, padded=st.padding_free is not True,  # auto: planned padded (the mask is small)
        device=device, n_gpus=n_gpus)
