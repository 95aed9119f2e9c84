"""Load a VLM of any supported family (:mod:`qlora_med.config.families`) for training or inference: the dtype
table (:data:`DTYPES`), the compute dtype, the quantization config (the family's tower, connector and lm_head
skipped), :func:`load_model` and the LoRA target regex.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from qlora_med.config.families import Family, hf_class_name
from qlora_med.config.schema import LoraConfig, ModelConfig
from qlora_med.model.family import connector_modules, connector_parameters, family_of_dir, load_processor

logger = logging.getLogger(__name__)

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


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype, family: Family):
    """The BitsAndBytesConfig for the LLM (the family's vision tower, connector and lm_head skipped), or None.

    Full module paths: with transformers 5 bare names ("multi_modal_projector") do not stop quantization."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=family.quant_skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # FSDP shards parameters of one dtype: store NF4 in the compute dtype so it can shard them
        bnb_4bit_quant_storage=compute_dtype if _under_fsdp() else torch.uint8,
        llm_int8_skip_modules=family.quant_skip,
    )


def _cast_input_to_weight(module: torch.nn.Module, args: tuple) -> tuple:
    """Connector pre-hook: full-precision connector fed by a half-precision vision tower."""
    weight = next(module.parameters())
    return (args[0].to(weight.dtype), *args[1:])


def _cast_output(dtype: torch.dtype):
    def hook(module: torch.nn.Module, args: tuple, output):
        return output.to(dtype) if isinstance(output, torch.Tensor) else output

    return hook


def load_model(cfg: ModelConfig, base_dir: Path, compute_dtype: torch.dtype, device_map=None):
    """Load the model with its LLM quantized as configured and its connector in fp32 (fed and read in the compute
    dtype). The class comes from the family table; the attention implementation is the one
    :func:`qlora_med.patches.select.resolve_attn_implementation` picks."""
    import transformers

    from qlora_med.patches import bnb_cpu
    from qlora_med.patches.select import resolve_attn_implementation  # here: it imports Triton, bitsandbytes

    family = family_of_dir(base_dir)
    config = transformers.AutoConfig.from_pretrained(base_dir)
    cls = getattr(transformers, hf_class_name(config.model_type))
    quant = quantization_config(cfg, compute_dtype, family)
    if quant is not None:
        bnb_cpu.install()
    if device_map is None and torch.cuda.is_available() and not _under_fsdp():  # FSDP places shards itself
        device_map = {"": torch.cuda.current_device()}
    model = cls.from_pretrained(
        base_dir,
        quantization_config=quant,
        dtype=compute_dtype,
        device_map=device_map,
        attn_implementation=resolve_attn_implementation(cfg.attn_implementation),
    )
    if quant is not None:
        bnb_cpu.keep_training_numerics(model)
    for param in connector_parameters(model, family).values():
        param.data = param.data.float()
    for module in connector_modules(model, family):
        module.register_forward_pre_hook(_cast_input_to_weight)
        module.register_forward_hook(_cast_output(compute_dtype))
    model.config.use_cache = False
    processor = load_processor(base_dir, family)
    logger.info("loaded %s (%s; LLM: %s, compute %s)", base_dir, family.title, cfg.quantization, compute_dtype)
    return model, processor


def lora_target_regex(lora: LoraConfig, family: Family) -> str:
    """PEFT target regex: the named linear layers of the family's language model only."""
    names = "|".join(sorted(set(lora.target_modules)))
    prefix = family.language_model.replace(".", "\\.")
    return rf"^{prefix}\.layers\.\d+\..*\.({names})$"
