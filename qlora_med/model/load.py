"""Load a LLaVA for training or inference: the dtype table (:data:`DTYPES`), the compute dtype, the
quantization config (and the modules it skips), :func:`load_model`, the projector, image tokens per image and
the LoRA target regex.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from qlora_med.config.schema import LoraConfig, ModelConfig

logger = logging.getLogger(__name__)

# Full module paths: with transformers 5 bare names ("multi_modal_projector") do not stop quantization.
QUANT_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # recipe / CLI names


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
        return DTYPES[name]
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        logger.info("compute dtype: %s (CUDA device %s)", dtype, torch.cuda.get_device_name())
        return dtype
    dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    logger.info(
        "compute dtype: %s (CPU %s native bf16)", dtype, "with" if dtype == torch.bfloat16 else "without"
    )
    return dtype


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


def _cast_input_to_weight(module: torch.nn.Module, args: tuple) -> tuple:
    """Projector pre-hook: full-precision projector fed by a half-precision vision tower."""
    weight = module.linear_1.weight
    return (args[0].to(weight.dtype), *args[1:])


def load_model(cfg: ModelConfig, base_dir: Path, compute_dtype: torch.dtype, device_map=None):
    """Load the LLaVA with the LLM quantized as configured; the projector is kept in fp32. The attention
    implementation is the one :func:`qlora_med.patches.select.resolve_attn_implementation` picks."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from qlora_med.patches import bnb_cpu
    from qlora_med.patches.select import resolve_attn_implementation  # here: it imports Triton, bitsandbytes

    quant = quantization_config(cfg, compute_dtype)
    if quant is not None:
        bnb_cpu.install()
    if device_map is None and torch.cuda.is_available() and not _under_fsdp():  # FSDP places shards itself
        device_map = {"": torch.cuda.current_device()}
    model = LlavaForConditionalGeneration.from_pretrained(
        base_dir,
        quantization_config=quant,
        dtype=compute_dtype,
        device_map=device_map,
        attn_implementation=resolve_attn_implementation(cfg.attn_implementation),
    )
    if quant is not None:
        bnb_cpu.keep_training_numerics(model)
    projector = projector_module(model)
    projector.float()
    projector.register_forward_pre_hook(_cast_input_to_weight)
    model.config.use_cache = False
    processor = AutoProcessor.from_pretrained(base_dir)
    logger.info("loaded %s (LLM: %s, compute %s)", base_dir, cfg.quantization, compute_dtype)
    return model, processor


def projector_module(model: torch.nn.Module) -> torch.nn.Module:
    """The LLaVA projector inside a (possibly PEFT-wrapped) model."""
    for name, module in model.named_modules():
        if name.endswith("multi_modal_projector"):
            return module
    raise ValueError("model has no multi_modal_projector")


def num_image_tokens(model_config) -> int:
    """Image tokens per image for a CLIP tower with the 'default' strategy (CLS dropped)."""
    vision = model_config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    return n + (1 if model_config.vision_feature_select_strategy == "full" else 0)


def lora_target_regex(lora: LoraConfig) -> str:
    """PEFT target regex: the named linear layers of the language model only."""
    names = "|".join(sorted(set(lora.target_modules)))
    return rf"^model\.language_model\.layers\.\d+\..*\.({names})$"
