"""Build, load and quantize the LLaVA model; set what a stage trains.

Two ways in: an HF-format LLaVA directory, or LLaVA-Med style composition (CLIP dir + LLM dir +
fresh projector), which is written once as an HF-format directory under ``model.cache_dir`` and
then loaded through the same ``from_pretrained`` path as everything else.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from qlora_med.artifacts.adapter import ADAPTER_FILE, load_projector
from qlora_med.config.schema import LoraConfig
from qlora_med.config.stages import TrainSpec
from qlora_med.errors import ConfigError
from qlora_med.model.load import lora_target_regex, projector_module

logger = logging.getLogger(__name__)


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
