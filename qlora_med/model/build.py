"""Build the HF-format LLaVA directory a recipe's ``model:`` names: the tiny demo model, LLaVA-Med style
composition, and their tokenizer / processor.

Three ways in (:func:`base_model_dir`): a LLaVA folder or Hub id as it is (a Hub id is downloaded into the HF
cache, :func:`qlora_med.model.source.resolve_model`); ``model.tiny`` (a tiny LLaVA built from config with the real
Mistral tokenizer, :func:`qlora_med.model.tiny.build_tiny`); or composition (CLIP + LLM, each a folder or a Hub id, + fresh projector,
:func:`compose`), written once under ``model.cache_dir``. Each is then loaded through the same
``from_pretrained`` path (:mod:`qlora_med.model.load`). Building never changes the caller's global RNG state:
random init runs under :func:`torch.random.fork_rng`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from qlora_med.config.schema import ModelConfig
from qlora_med.io import atomic_dir
from qlora_med.model.processor import add_llava_tokens, make_processor
from qlora_med.model.source import resolve_model
from qlora_med.model.tiny import build_tiny_model

logger = logging.getLogger(__name__)


def _init_projector(projector: torch.nn.Module, projector_type: str) -> None:
    for layer in (projector.linear_1, projector.linear_2):
        layer.reset_parameters()
    if projector_type == "linear":  # linear_2 starts as the identity: the map is one linear layer
        with torch.no_grad():
            projector.linear_2.weight.copy_(torch.eye(projector.linear_2.weight.shape[0]))
            projector.linear_2.bias.zero_()


def compose(cfg: ModelConfig) -> Path:
    """Write CLIP tower + LLM + fresh projector as an HF LLaVA dir (once; cached by inputs: a Hub model by its
    snapshot folder, which names the commit)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    tower_dir = resolve_model(
        cfg.vision_tower, key="model.vision_tower", allow_pickle=cfg.allow_pickle, role="vision_tower"
    )
    llm_dir = resolve_model(cfg.llm, key="model.llm", allow_pickle=cfg.allow_pickle, role="llm")
    key = json.dumps(
        [
            str(tower_dir.resolve()),
            str(llm_dir.resolve()),
            cfg.projector_type,
            cfg.vision_feature_layer,
            cfg.image_token,
        ]
    )
    out = Path(cfg.cache_dir) / "composed" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (out / "config.json").is_file():
        return out
    logger.info(
        "composing %s + %s + fresh %s projector into %s", cfg.vision_tower, cfg.llm, cfg.projector_type, out
    )
    vision = CLIPVisionModel.from_pretrained(tower_dir, dtype="auto")
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    add_llava_tokens(tokenizer, cfg.image_token)
    if len(tokenizer) > llm.config.vocab_size:
        llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    llm.config.pad_token_id = tokenizer.pad_token_id
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=llm.config,
        projector_hidden_act="gelu" if cfg.projector_type == "mlp2x_gelu" else "linear",
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy="default",
        image_token_index=tokenizer.convert_tokens_to_ids(cfg.image_token),
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower = vision
    llava.model.language_model = llm.model
    llava.lm_head = llm.lm_head
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is kept
        projector = LlavaMultiModalProjector(config).to(llm.dtype)
        _init_projector(projector, cfg.projector_type)
    llava.model.multi_modal_projector = projector
    try:
        image_processor = CLIPImageProcessorPil.from_pretrained(tower_dir)
    except OSError:
        size = vision.config.image_size
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    processor = make_processor(
        tokenizer, vision.config.image_size, vision.config.patch_size, cfg.image_token, image_processor
    )
    with atomic_dir(out) as tmp:
        llava.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out


def base_model_dir(cfg: ModelConfig) -> Path:
    """The LLaVA directory for this config: a local folder, a Hub model's snapshot in the HF cache (downloaded
    at ``model.revision`` when missing), or a tiny / composed one built when needed.

    Its config.json is checked first (:mod:`qlora_med.config.model_kind`): an HF LLaVA, or LLaVA's original
    layout (``llava_mistral`` / ``llava_llama``), which :func:`qlora_med.model.original.ensure_hf_layout`
    converts; anything else is refused before any weights download.
    """
    if cfg.vision_tower is not None:
        return compose(cfg).resolve()
    if cfg.tiny is not None:
        path = Path(cfg.name_or_path)
        if not (path / "config.json").is_file():
            build_tiny_model(cfg.tiny, path, cfg.image_token)
        return path.resolve()
    from qlora_med.model.original import ensure_hf_layout, hub_tower_resolver

    folder = resolve_model(
        cfg.name_or_path,
        key="model.name_or_path",
        allow_pickle=cfg.allow_pickle,
        revision=cfg.revision,
        role="llava",
    )
    cache = Path(cfg.cache_dir)
    return ensure_hf_layout(folder, cache, hub_tower_resolver(cfg.allow_pickle), allow_pickle=cfg.allow_pickle).resolve()
