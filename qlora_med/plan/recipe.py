"""The planner's inputs from a recipe or a model config: model shape (``ModelShape``) and run settings (``RunSpec``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qlora_med.config.batch import stage_batch
from qlora_med.errors import ConfigError
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


def shape_from_config_dict(cfg: dict, name: str = "config") -> ModelShape:
    """ModelShape from a HF ``config.json`` dict: a LlavaConfig (text_config + vision_config) or a plain LLM."""
    text = cfg.get("text_config", cfg)
    heads = text["num_attention_heads"]
    llm = LLMShape(text["num_hidden_layers"], text["hidden_size"], text["intermediate_size"], heads,
                   text.get("num_key_value_heads") or heads, text["vocab_size"], text.get("head_dim"),
                   bool(text.get("tie_word_embeddings", False)))
    v = cfg.get("vision_config")
    if not v:
        return ModelShape(name, llm)
    vision = VisionShape(v["num_hidden_layers"], v["hidden_size"], v["intermediate_size"], v["num_attention_heads"],
                         v["image_size"], v["patch_size"])
    return ModelShape(name, llm, vision, "linear" if cfg.get("projector_type") == "linear" else "mlp2x_gelu")


def _read_config(path: str | None) -> dict | None:
    config = Path(path or "").expanduser() / "config.json"
    return json.loads(config.read_text()) if path and config.is_file() else None


def shape_from_recipe(recipe: object) -> ModelShape:
    """Model shape of a ``RecipeConfig``: the tiny builder's sizes, ``model.name_or_path``'s config.json,
    the compose-mode ``model.vision_tower`` + ``model.llm`` config.json files, or a preset name."""
    m = recipe.model  # type: ignore[attr-defined]
    if m.tiny is not None:  # qlora_med.model.build_tiny: CLIP MLP 4x hidden, vocab = tokenizer rounded up to 64
        t = m.tiny
        return ModelShape("tiny", LLMShape(t.text_layers, t.text_hidden, t.text_intermediate, t.text_heads,
                                           t.text_kv_heads, 32064),
                          VisionShape(t.vision_layers, t.vision_hidden, 4 * t.vision_hidden, t.vision_heads,
                                      t.image_size, t.patch_size))
    if m.name_or_path is not None:
        cfg = _read_config(m.name_or_path)
        if cfg is not None:
            return shape_from_config_dict(cfg, name=Path(m.name_or_path).name)
        try:
            return preset(m.name_or_path)
        except ValueError as err:
            raise ConfigError(f"model.name_or_path: no config.json in {m.name_or_path} and {err}") from None
    name = f"{Path(m.vision_tower).name} + {Path(m.llm).name}"
    vision, llm = _read_config(m.vision_tower), _read_config(m.llm)
    if vision is not None and llm is not None:
        cfg = {"text_config": llm, "vision_config": vision.get("vision_config", vision), "projector_type": m.projector_type}
        return shape_from_config_dict(cfg, name=name)
    try:  # not downloaded yet: known directory names
        shape = ModelShape(name, preset(Path(m.llm).name).llm, VISION_BY_NAME[Path(m.vision_tower).name.lower()],
                           m.projector_type)
    except (ValueError, KeyError):
        missing = m.vision_tower if vision is None else m.llm
        raise ConfigError(f"model: no config.json in {missing}; download the model first or plan with --model PRESET") from None
    logger.warning("model not downloaded: shape of %s taken from the directory names", name)
    return shape


def run_for_stage(recipe: object, stage: object, n_gpus: int = 1, device: str = "cuda") -> RunSpec:
    """RunSpec of one recipe stage as configured (batch, accumulation, length, optimizer, LoRA)."""
    lora, model, st = recipe.lora, recipe.model, stage  # type: ignore[attr-defined]
    optim = st.optim  # type: ignore[attr-defined]
    optimizer = ("paged_" if "paged" in optim else "") + ("adamw_8bit" if "8bit" in optim else "adamw")
    dtype = model.compute_dtype if model.compute_dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    targets = tuple(t.removesuffix("_proj") for t in lora.target_modules if t.removesuffix("_proj") in LORA_TARGETS)
    micro, accum = st.per_device_batch_size, st.gradient_accumulation_steps
    if micro != "auto":  # fixed, or accumulation derived from global_batch_size for n_gpus
        batch = stage_batch(st, n_gpus)
        micro, accum = batch.micro_batch, batch.accumulation
    return RunSpec(
        micro_batch=micro, grad_accum=accum, seq_len=st.max_length,
        lora_rank=lora.r if st.train.llm == "lora" else 0, lora_targets=targets, lora_dropout=lora.dropout,
        optimizer="paged_adamw_32bit" if optimizer == "paged_adamw" else optimizer,
        grad_checkpointing=st.gradient_checkpointing, compute_dtype=dtype, quantization=model.quantization,
        double_quant=model.double_quant, padded=not st.padding_free, device=device, n_gpus=n_gpus)
