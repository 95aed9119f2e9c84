"""What a stage trains: apply its ``TrainSpec`` to the loaded model, and check a continued adapter's settings.

``setup_trainable`` freezes every parameter, turns on gradient checkpointing (all or the first k decoder layers), then either continues the
LoRA adapter found in the start point's ``final/`` (the previous stage's, or ``init_from``) or adds new
adapters with the recipe's ``lora`` settings, keeps trainable weights fp32, loads the start point's
projector and sets whether the projector trains. The table of what each stage kind trains is in
``qlora_med.config.stages``.

A continued adapter keeps the rank, alpha, dropout and targets it was created with, so
``check_continued_adapter`` refuses (before any model is loaded) a stage whose recipe ``lora`` says otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qlora_med.artifacts.adapter import ADAPTER_FILE, load_projector
from qlora_med.config.families import FAMILIES
from qlora_med.config.schema import LoraConfig, StageConfig
from qlora_med.config.stages import TrainSpec
from qlora_med.errors import ConfigError
from qlora_med.model.family import connector_parameters, family_of_config
from qlora_med.model.load import lora_target_regex
from qlora_med.train.checkpointing import enable_checkpointing

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"


def has_adapter(start: Path | None) -> bool:
    """Whether a stage's start point (a ``final/``) holds a LoRA adapter that the stage will continue."""
    return start is not None and (start / ADAPTER_FILE).is_file()


def lora_settings(peft_config: Mapping[str, Any]) -> dict[str, Any]:
    """A PEFT LoRA config (``adapter_config.json`` keys) as the recipe's ``lora`` keys, as plain data.

    ``target_modules`` becomes the sorted layer names when it is one of our regexes
    (``qlora_med.model.load.lora_target_regex``) or a list/set, else the string as written.
    """
    targets = peft_config["target_modules"]
    if isinstance(targets, str):
        targets = _target_names(targets)
    elif targets is not None:
        targets = sorted(targets)
    return {"r": peft_config["r"], "alpha": peft_config["lora_alpha"], "dropout": peft_config["lora_dropout"],
            "target_modules": targets}


def _target_names(regex: str) -> list[str] | str:
    """The layer names in a regex written by ``lora_target_regex``; any other regex unchanged."""
    for family in FAMILIES.values():
        head, _, tail = lora_target_regex(LoraConfig(target_modules=["NAMES"]), family).partition("NAMES")
        if regex.startswith(head) and regex.endswith(tail) and len(regex) > len(head) + len(tail):
            names = sorted(regex[len(head):len(regex) - len(tail)].split("|"))
            if lora_target_regex(LoraConfig(target_modules=names), family) == regex:
                return names
    return regex


def check_continued_adapter(stage: StageConfig, lora: LoraConfig, start: Path | None) -> None:
    """Raise ``ConfigError`` when the stage continues training ``start``'s adapter but ``lora`` differs from it.

    Only a stage that trains LoRA (``train.llm: lora``) from a start point with an adapter is checked: a
    frozen-LLM stage carries the adapter along untouched and the recipe's ``lora`` does not apply to it.
    """
    if stage.train.llm != "lora" or not has_adapter(start):
        return
    config_file = start / ADAPTER_CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"stages.{stage.name}: {start} has {ADAPTER_FILE} but no {ADAPTER_CONFIG_FILE}; "
                          "start the stage from a complete final/ folder")
    adapter = lora_settings(json.loads(config_file.read_text()))
    wanted = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
              "target_modules": sorted(set(lora.target_modules))}
    differing = [key for key in wanted if adapter[key] != wanted[key]]
    if differing:
        diffs = "; ".join(f"lora.{k}: adapter {adapter[k]!r}, recipe {wanted[k]!r}" for k in differing)
        fix = ", ".join(f"lora.{k}={adapter[k]!r}" for k in differing)
        raise ConfigError(
            f"stages.{stage.name}: continues the LoRA adapter in {start}, whose settings differ from the recipe "
            f"({diffs}); a continued adapter keeps its own settings. Set {fix} in the recipe, or start stage "
            f"'{stage.name}' from a folder without an adapter (init_from)"
        )


def setup_trainable(model, train: TrainSpec, lora: LoraConfig, previous: Path | None, gradient_checkpointing: bool,
                    checkpoint_layers: int | None = None):
    """Freeze everything, then enable what the stage trains; continue earlier adapters and projector. With
    ``gradient_checkpointing``, the first ``checkpoint_layers`` decoder layers are checkpointed (None: all).

    Returns the model to train (a ``PeftModel`` when the LLM gets LoRA or an earlier stage trained it).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model, checkpoint_layers)
    if has_adapter(previous):
        model = PeftModel.from_pretrained(model, previous, is_trainable=train.llm == "lora")
        logger.info("continuing LoRA adapters from %s (%s)", previous, "trainable" if train.llm == "lora" else "frozen")
    elif train.llm == "lora":
        peft_cfg = PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
            target_modules=lora_target_regex(lora, family_of_config(model.config)), task_type="CAUSAL_LM",
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
    for param in connector_parameters(model, family_of_config(model.config)).values():
        param.requires_grad_(train.projector == "full")
    return model
