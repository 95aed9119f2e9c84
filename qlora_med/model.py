"""Build, load and quantize the LLaVA model; set what a stage trains.

Two ways in: an HF-format LLaVA directory, or LLaVA-Med style composition (CLIP dir + LLM dir +
fresh projector), which is written once as an HF-format directory under ``model.cache_dir`` and
then loaded through the same ``from_pretrained`` path as everything else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from qlora_med.checkpoint import ADAPTER_FILE, atomic_dir, load_projector, projector_module
from qlora_med.config import LoraConfig, ModelConfig, TinyModelConfig
from qlora_med.errors import ConfigError
from qlora_med.stages import TrainSpec

logger = logging.getLogger(__name__)

# Full module paths: with transformers 5 bare names ("multi_modal_projector") do not stop quantization.
QUANT_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises AVX512-BF16 or AMX-BF16 (else bf16 matmuls are emulated, ~10x slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_compute_dtype(name: str) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it (else fp16), fp32 on CPUs without native bf16."""
    if name != "auto":
        return _DTYPES[name]
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        logger.info("compute dtype: %s (CUDA device %s)", dtype, torch.cuda.get_device_name())
        return dtype
    dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    logger.info("compute dtype: %s (CPU %s native bf16)", dtype, "with" if dtype == torch.bfloat16 else "without")
    return dtype


def resolve_attn_implementation(name: str) -> str:
    """``auto``: flash_attention_2 when flash-attn imports on CUDA, else sdpa. Logs the path taken."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            logger.info("attention: flash_attention_2 (flash-attn installed)")
            return "flash_attention_2"
        except ImportError:
            logger.info("attention: sdpa (flash-attn not installed; `pip install qlora-med[cuda]` to enable)")
    else:
        logger.info("attention: sdpa (no CUDA device)")
    return "sdpa"


def _under_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype):
    """The BitsAndBytesConfig for the LLM (vision tower, projector and lm_head skipped), or None."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANT_SKIP_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # FSDP shards parameters of one dtype: store NF4 in the compute dtype so it can shard them
        bnb_4bit_quant_storage=compute_dtype if _under_fsdp() else torch.uint8,
        llm_int8_skip_modules=QUANT_SKIP_MODULES,
    )


# ---------------------------------------------------------------- building model directories


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
            hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_hidden * 4,
            num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
            image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden,
        )
        text = MistralConfig(
            vocab_size=vocab, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            num_key_value_heads=cfg.text_kv_heads, max_position_embeddings=4096, sliding_window=None,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        )
        config = LlavaConfig(
            vision_config=vision, text_config=text, projector_hidden_act="gelu", vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_token_index=tokenizer.convert_tokens_to_ids(image_token),
        )
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

    key = json.dumps([str(Path(cfg.vision_tower).resolve()), str(Path(cfg.llm).resolve()),
                      cfg.projector_type, cfg.vision_feature_layer, cfg.image_token])
    out = Path(cfg.cache_dir) / "composed" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (out / "config.json").is_file():
        return out
    logger.info("composing %s + %s + fresh %s projector into %s", cfg.vision_tower, cfg.llm, cfg.projector_type, out)
    vision = CLIPVisionModel.from_pretrained(cfg.vision_tower, dtype="auto")
    llm = AutoModelForCausalLM.from_pretrained(cfg.llm, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
    add_llava_tokens(tokenizer, cfg.image_token)
    if len(tokenizer) > llm.config.vocab_size:
        llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    llm.config.pad_token_id = tokenizer.pad_token_id
    config = LlavaConfig(
        vision_config=vision.config, text_config=llm.config,
        projector_hidden_act="gelu" if cfg.projector_type == "mlp2x_gelu" else "linear",
        vision_feature_layer=cfg.vision_feature_layer, vision_feature_select_strategy="default",
        image_token_index=tokenizer.convert_tokens_to_ids(cfg.image_token),
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower = vision
    llava.model.language_model = llm.model
    llava.lm_head = llm.lm_head
    projector = LlavaMultiModalProjector(config).to(llm.dtype)
    _init_projector(projector, cfg.projector_type)
    llava.model.multi_modal_projector = projector
    try:
        image_processor = CLIPImageProcessorPil.from_pretrained(cfg.vision_tower)
    except OSError:
        size = vision.config.image_size
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = make_processor(tokenizer, vision.config.image_size, vision.config.patch_size, cfg.image_token,
                               image_processor)
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


# ---------------------------------------------------------------- loading


def _cast_input_to_weight(module: torch.nn.Module, args: tuple) -> tuple:
    """Projector pre-hook: full-precision projector fed by a half-precision vision tower."""
    weight = module.linear_1.weight
    return (args[0].to(weight.dtype), *args[1:])


def load_model(cfg: ModelConfig, base_dir: Path, compute_dtype: torch.dtype, device_map=None):
    """Load the LLaVA with the LLM quantized as configured; the projector is kept in fp32."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    quant = quantization_config(cfg, compute_dtype)
    if device_map is None and torch.cuda.is_available() and not _under_fsdp():  # FSDP places shards itself
        device_map = {"": torch.cuda.current_device()}
    model = LlavaForConditionalGeneration.from_pretrained(
        base_dir, quantization_config=quant, dtype=compute_dtype, device_map=device_map,
        attn_implementation=resolve_attn_implementation(cfg.attn_implementation),
    )
    projector = projector_module(model)
    projector.float()
    projector.register_forward_pre_hook(_cast_input_to_weight)
    model.config.use_cache = False
    processor = AutoProcessor.from_pretrained(base_dir)
    logger.info("loaded %s (LLM: %s, compute %s)", base_dir, cfg.quantization, compute_dtype)
    return model, processor


def lora_target_regex(lora: LoraConfig) -> str:
    """PEFT target regex: the named linear layers of the language model only."""
    names = "|".join(sorted(set(lora.target_modules)))
    return rf"^model\.language_model\.layers\.\d+\..*\.({names})$"


def setup_trainable(model, train: TrainSpec, lora: LoraConfig, previous: Path | None, gradient_checkpointing: bool):
    """Freeze everything, then enable what the stage trains; continue earlier adapters and projector.

    Returns the model to train (a ``PeftModel`` when the LLM gets LoRA or an earlier stage trained it).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    has_previous_adapter = previous is not None and (previous / ADAPTER_FILE).is_file()
    if has_previous_adapter:
        model = PeftModel.from_pretrained(model, previous, is_trainable=train.llm == "lora")
        logger.info("continuing LoRA adapters from %s (%s)", previous, "trainable" if train.llm == "lora" else "frozen")
    elif train.llm == "lora":
        peft_cfg = PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
            target_modules=lora_target_regex(lora), task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_cfg)
        if not any("lora_" in n for n, _ in model.named_parameters()):
            raise ConfigError(f"lora.target_modules {lora.target_modules} matched no LLM linear layer")
    for param in model.parameters():  # adapters are fp32 master weights; autocast handles bf16 compute
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if previous is not None:
        load_projector(model, previous)
        logger.info("loaded projector from %s", previous)
    projector_module(model).requires_grad_(train.projector == "full")
    return model


def trainable_parameter_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
