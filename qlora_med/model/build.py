"""Build the HF-format LLaVA directory a recipe's ``model:`` names: the tiny demo model, LLaVA-Med style
composition, and their tokenizer / processor.

Three ways in (:func:`base_model_dir`): an HF-format LLaVA directory as it is; ``model.tiny`` (a tiny LLaVA built
from config with the real Mistral tokenizer, :func:`build_tiny`); or composition (CLIP dir + LLM dir + fresh
projector, :func:`compose`), written once under ``model.cache_dir``. Each is then loaded through the same
``from_pretrained`` path (:mod:`qlora_med.model.load`). Building never changes the caller's global RNG state:
random init runs under :func:`torch.random.fork_rng`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from qlora_med.config.schema import ModelConfig, TinyModelConfig
from qlora_med.errors import ConfigError
from qlora_med.io import atomic_dir

logger = logging.getLogger(__name__)


def mistral_tokenizer(out: Path):
    """The real Mistral-7B-Instruct-v0.2 SentencePiece tokenizer shipped in ``mistral-common``."""
    import mistral_common
    from transformers import LlamaTokenizer

    src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, out / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(out)


def add_llava_tokens(tokenizer, image_token: str) -> None:
    """Add the image placeholder (and a pad token when missing) as special tokens."""
    tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})


def make_processor(tokenizer, image_size: int, patch_size: int, image_token: str, image_processor=None):
    """A LlavaProcessor for a CLIP tower with the 'default' feature strategy (CLS dropped)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if image_processor is None:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=image_token,
    )


def _init_projector(projector: torch.nn.Module, projector_type: str) -> None:
    for layer in (projector.linear_1, projector.linear_2):
        layer.reset_parameters()
    if projector_type == "linear":  # linear_2 starts as the identity: the map is one linear layer
        with torch.no_grad():
            projector.linear_2.weight.copy_(torch.eye(projector.linear_2.weight.shape[0]))
            projector.linear_2.bias.zero_()


def build_tiny(cfg: TinyModelConfig, out: Path, image_token: str = "<image>") -> Path:
    """Write a tiny LLaVA (CLIP + Mistral from config, real Mistral tokenizer) to ``out``."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    with atomic_dir(out) as tmp:
        tokenizer = mistral_tokenizer(tmp)
        add_llava_tokens(tokenizer, image_token)
        vocab = (len(tokenizer) + 63) // 64 * 64
        vision = CLIPVisionConfig(
            hidden_size=cfg.vision_hidden,
            intermediate_size=cfg.vision_hidden * 4,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            projection_dim=cfg.vision_hidden,
        )
        text = MistralConfig(
            vocab_size=vocab,
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_intermediate,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            num_key_value_heads=cfg.text_kv_heads,
            max_position_embeddings=4096,
            sliding_window=None,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            projector_hidden_act="gelu",
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_token_index=tokenizer.convert_tokens_to_ids(image_token),
        )
        with torch.random.fork_rng(devices=[]):  # seeded init; the caller's RNG (e.g. set_seed) is kept
            torch.manual_seed(cfg.seed)
            model = LlavaForConditionalGeneration(config)
            # A random lm_head with the usual 0.02 init caps every logit below ~1 after the final norm,
            # so a frozen head could barely fit anything; pretrained heads have far larger logits.
            torch.nn.init.normal_(model.lm_head.weight, std=cfg.lm_head_std)
        model.save_pretrained(tmp)
        make_processor(tokenizer, cfg.image_size, cfg.patch_size, image_token).save_pretrained(tmp)
    logger.info("built tiny LLaVA in %s", out)
    return out


def compose(cfg: ModelConfig) -> Path:
    """Write CLIP tower + LLM + fresh projector as an HF LLaVA dir (once; cached by inputs)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    key = json.dumps(
        [
            str(Path(cfg.vision_tower).resolve()),
            str(Path(cfg.llm).resolve()),
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
    vision = CLIPVisionModel.from_pretrained(cfg.vision_tower, dtype="auto")
    llm = AutoModelForCausalLM.from_pretrained(cfg.llm, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
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
        image_processor = CLIPImageProcessorPil.from_pretrained(cfg.vision_tower)
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
    """The HF-format LLaVA directory for this config (building tiny / composed ones when needed)."""
    if cfg.vision_tower is not None:
        return compose(cfg).resolve()
    path = Path(cfg.name_or_path)
    if cfg.tiny is not None and not (path / "config.json").is_file():
        build_tiny(cfg.tiny, path, cfg.image_token)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: '{path}' has no config.json (not an HF LLaVA checkpoint)")
    return path.resolve()
