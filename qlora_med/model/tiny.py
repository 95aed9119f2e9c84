"""Tiny models of every family, built from config (a few MB) for the demo and the family test matrix.

:func:`build_tiny_model` writes one into a folder as the family's Hub release would look (weights, processor
or tokenizer + image processor, chat template), so it loads through the real ``from_pretrained`` path. LLaVA is
:func:`build_tiny`. LLaVA-NeXT and Gemma 3 use the real Mistral-v0.2 SentencePiece
tokenizer (with Gemma's special tokens added for Gemma 3); no Qwen tokenizer ships on PyPI, so Qwen2.5-VL gets
a small byte-level BPE trained on the repo's sample data. The chat templates are the families' own
(``chat_templates/*.jinja``: llava-v1.6-mistral's, Qwen2-VL-Instruct's, Gemma 3's).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from qlora_med.config.schema import TinyModelConfig
from qlora_med.io import atomic_dir
from qlora_med.model.processor import add_llava_tokens, make_processor, mistral_tokenizer

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "chat_templates"
SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
GEMMA_SPECIAL = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def _jinja(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def _text(cfg: TinyModelConfig, vocab: int, tokenizer, **extra) -> dict:
    return {"vocab_size": vocab, "hidden_size": cfg.text_hidden, "intermediate_size": cfg.text_intermediate,
            "num_hidden_layers": cfg.text_layers, "num_attention_heads": cfg.text_heads,
            "num_key_value_heads": cfg.text_kv_heads, "max_position_embeddings": 4096,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, **extra}


def _vocab(tokenizer) -> int:
    return (len(tokenizer) + 63) // 64 * 64


def _init(model_cls, config, cfg: TinyModelConfig):
    with torch.random.fork_rng(devices=[]):  # seeded init; the caller's RNG is kept
        torch.manual_seed(cfg.seed)
        model = model_cls(config)
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            torch.nn.init.normal_(head.weight, std=cfg.lm_head_std)  # as build_tiny: logits LoRA can move
    return model


def _clip(cfg: TinyModelConfig, image_size: int) -> dict:
    return {"model_type": "clip_vision_model", "hidden_size": cfg.vision_hidden,
            "intermediate_size": cfg.vision_hidden * 4, "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": cfg.vision_heads, "image_size": image_size, "patch_size": cfg.patch_size,
            "projection_dim": cfg.vision_hidden}


def _llava_next(cfg: TinyModelConfig, tmp: Path) -> None:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = mistral_tokenizer(tmp)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    tile = cfg.image_size // 2  # the tower's size; the grid's largest square (the default side) is 2x2 tiles
    grid = [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    config = LlavaNextConfig(
        vision_config=_clip(cfg, tile),
        text_config={"model_type": "mistral", **_text(cfg, _vocab(tokenizer), tokenizer, sliding_window=None)},
        image_grid_pinpoints=grid, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    _init(LlavaNextForConditionalGeneration, config, cfg).save_pretrained(tmp)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=grid
    )
    LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
        chat_template=_jinja("llava_next_mistral"),
    ).save_pretrained(tmp)


def _sample_text() -> list[str]:
    texts = []
    for file in sorted(SAMPLE.glob("*.json")):
        for record in json.loads(file.read_text()):
            texts += [turn["value"] for turn in record.get("conversations", [])]
            texts += [str(record.get(k, "")) for k in ("question", "answer", "text")]
    return [t for t in texts if t]


def qwen_tokenizer():
    """A byte-level BPE (the kind Qwen uses) trained on the sample data, with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=QWEN_SPECIAL, show_progress=False)
    bpe.train_from_iterator(_sample_text(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_SPECIAL[1:])


def _qwen2_5_vl(cfg: TinyModelConfig, tmp: Path) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qlora_med.model.family import ImageTextProcessor

    tokenizer = qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    head_dim = cfg.text_hidden // cfg.text_heads
    section = [head_dim // 8, head_dim * 3 // 16, head_dim // 2 - head_dim // 8 - head_dim * 3 // 16]
    config = Qwen2_5_VLConfig(
        vision_config={"depth": cfg.vision_layers, "hidden_size": cfg.vision_hidden,
                       "intermediate_size": cfg.vision_hidden * 2, "num_heads": cfg.vision_heads,
                       "out_hidden_size": cfg.text_hidden, "patch_size": cfg.patch_size, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 2 * cfg.patch_size * 2,
                       "fullatt_block_indexes": [cfg.vision_layers - 1]},
        text_config=_text(cfg, _vocab(tokenizer), tokenizer, tie_word_embeddings=False,
                          rope_scaling={"type": "mrope", "mrope_section": section}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    _init(Qwen2_5_VLForConditionalGeneration, config, cfg).save_pretrained(tmp)
    step, side = cfg.patch_size * 2, cfg.merged_side  # the default side: images are resized to side x side
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=step * step, max_pixels=side * side, patch_size=cfg.patch_size, merge_size=2, temporal_patch_size=2
    )
    ImageTextProcessor(image_processor, tokenizer, _jinja("qwen2_vl"), "<|image_pad|>").save_pretrained(tmp)


def _gemma3(cfg: TinyModelConfig, tmp: Path) -> None:
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = mistral_tokenizer(tmp)
    turns = ["<start_of_turn>", "<end_of_turn>"]
    tokenizer.add_special_tokens({"additional_special_tokens": [*turns, *GEMMA_SPECIAL.values()], "pad_token": "<pad>"})
    tokenizer.save_pretrained(tmp)  # reloaded with Gemma's named image tokens (boi_token, ...), as Gemma's own
    tokenizer = AutoTokenizer.from_pretrained(tmp, extra_special_tokens=GEMMA_SPECIAL)
    patches = (cfg.image_size // cfg.patch_size) ** 2
    tokens = 4 if patches % 4 == 0 else patches  # a square that divides the patch grid
    config = Gemma3Config(
        vision_config={"hidden_size": cfg.vision_hidden, "intermediate_size": cfg.vision_hidden * 4,
                       "num_hidden_layers": cfg.vision_layers, "num_attention_heads": cfg.vision_heads,
                       "image_size": cfg.image_size, "patch_size": cfg.patch_size},
        text_config=_text(cfg, _vocab(tokenizer), tokenizer, head_dim=cfg.text_hidden // cfg.text_heads,
                          sliding_window=512, sliding_window_pattern=cfg.text_layers),  # last layer global
        mm_tokens_per_image=tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(GEMMA_SPECIAL["image_token"]),
        boi_token_index=tokenizer.convert_tokens_to_ids(GEMMA_SPECIAL["boi_token"]),
        eoi_token_index=tokenizer.convert_tokens_to_ids(GEMMA_SPECIAL["eoi_token"]),
    )
    _init(Gemma3ForConditionalGeneration, config, cfg).save_pretrained(tmp)
    image_processor = Gemma3ImageProcessorPil(size={"height": cfg.image_size, "width": cfg.image_size})
    Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens,
                    chat_template=_jinja("gemma3")).save_pretrained(tmp)


BUILDERS = {"llava_next": _llava_next, "qwen2_5_vl": _qwen2_5_vl, "gemma3": _gemma3}


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


def build_tiny_model(cfg: TinyModelConfig, out: Path, image_token: str = "<image>") -> Path:
    """Write the tiny model of ``cfg.family`` to ``out`` (atomically)."""
    if cfg.family == "llava":
        return build_tiny(cfg, out, image_token)
    with atomic_dir(out) as tmp:
        BUILDERS[cfg.family](cfg, tmp)
    logger.info("built tiny %s in %s", cfg.family, out)
    return out
