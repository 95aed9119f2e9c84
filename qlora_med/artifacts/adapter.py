"""A stage's trainable state on disk: the PEFT LoRA adapter and ``projector.safetensors``, never the frozen base.

:func:`save_trainable` writes both (into a checkpoint-N/ or ``final/``); :func:`load_trainable` restores both in
place when resuming; :func:`load_projector` loads the projector alone (a stage starting from an earlier one).
The file names belong to the run layout (:mod:`qlora_med.artifacts.run_dir`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qlora_med.artifacts.run_dir import ADAPTER_FILE, PROJECTOR_FILE
from qlora_med.model.family import connector_state, load_connector_state


def save_trainable(model: torch.nn.Module, out: Path) -> None:
    """Write the LoRA adapter (PEFT format, if any) and the projector (the family's connector) weights to ``out``,
    keyed by full module path (``model.multi_modal_projector.linear_1.weight``)."""
    from peft import PeftModel

    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(out)
    save_file(connector_state(model), out / PROJECTOR_FILE, metadata={"format": "pt"})


def load_projector(model: torch.nn.Module, src: Path) -> None:
    """Load projector weights saved by :func:`save_trainable` (dtype of the live module kept)."""
    load_connector_state(model, load_file(src / PROJECTOR_FILE))


def load_trainable(model: torch.nn.Module, src: Path) -> None:
    """Restore adapter and projector weights in place (used when resuming a checkpoint)."""
    from peft import PeftModel, set_peft_model_state_dict

    if isinstance(model, PeftModel):
        adapter = src / ADAPTER_FILE
        if not adapter.is_file():
            raise FileNotFoundError(f"{src}: checkpoint has no {ADAPTER_FILE}")
        result = set_peft_model_state_dict(model, load_file(adapter))
        if result.unexpected_keys:
            raise ValueError(f"{src}: unexpected adapter keys {result.unexpected_keys[:5]}")
    load_projector(model, src)
