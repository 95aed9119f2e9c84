"""Curriculum stage semantics, as data: what each stage kind trains, its template and learning rates.

This is the one place to read what the curriculum does. A recipe's stage may override any of it.

| kind     | data                         | template         | projector | LLM  | vision tower | lr (LoRA / projector) |
|----------|------------------------------|------------------|-----------|------|--------------|-----------------------|
| align    | figure-caption pairs (PMC)   | plain            | full      | lora | frozen       | 2e-4 / 2e-3           |
| instruct | GPT-4 multi-turn instruct    | mistral_instruct | full      | lora | frozen       | 2e-4 / 2e-5           |
| vqa      | VQA-RAD / SLAKE / PathVQA    | mistral_instruct | full      | lora | frozen       | 2e-4 / 2e-5           |

The paper's stage 1 (projector only) is ``train: {llm: frozen}`` on an align stage
(``recipes/llava_med_v15_paper_align.yaml``).

Hand-off between stages: a stage starts from the previous stage's ``final/`` projector and, when
that stage (or one before it) trained LoRA adapters, *continues training those adapters*. We do
not merge them into the base: the base is NF4, and merging into it would re-quantize the sum and
lose the adapter's contribution (see ``qlora-med merge`` for a proper full-precision merge).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qlora_med.prompts.templates import TEMPLATES

__all__ = ["STAGE_PRESETS", "StagePreset", "TEMPLATES", "TrainSpec"]


@dataclass
class TrainSpec:
    """What a stage trains. The vision tower is always frozen in this kit."""

    projector: Literal["full", "frozen"] = "full"
    llm: Literal["lora", "frozen"] = "lora"
    vision_tower: Literal["frozen"] = "frozen"


@dataclass(frozen=True)
class StagePreset:
    """Defaults for one stage kind."""

    template: str
    train: TrainSpec
    learning_rate: float
    projector_lr: float
    data_kind: Literal["alignment", "conversation"]


STAGE_PRESETS: dict[str, StagePreset] = {
    "align": StagePreset("plain", TrainSpec("full", "lora"), 2e-4, 2e-3, "alignment"),
    "instruct": StagePreset("mistral_instruct", TrainSpec("full", "lora"), 2e-4, 2e-5, "conversation"),
    "vqa": StagePreset("mistral_instruct", TrainSpec("full", "lora"), 2e-4, 2e-5, "conversation"),
}
