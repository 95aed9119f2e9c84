"""What does a stage train: each stage kind's template, trained parts and learning rates, as data.

This is the one place to read what the curriculum does. A recipe's stage may override any of it; the
schema (``qlora_med.config.schema.StageConfig``) fills unset fields from these presets, and
:func:`qlora_med.train.trainable.setup_trainable` applies a stage's ``train`` to a model.

| kind     | data                         | template         | projector | LLM  | vision tower | lr (LoRA / projector) |
|----------|------------------------------|------------------|-----------|------|--------------|-----------------------|
| align    | figure-caption pairs (PMC)   | plain            | full      | lora | frozen       | 2e-4 / 2e-3           |
| instruct | GPT-4 multi-turn instruct    | mistral_instruct | full      | lora | frozen       | 2e-4 / 2e-5           |
| vqa      | VQA-RAD / SLAKE / PathVQA    | mistral_instruct | full      | lora | frozen       | 2e-4 / 2e-5           |

The paper's stage 1 (projector only) is ``train: {llm: frozen}`` on an align stage
(``recipes/llava_med_v15_paper_align.yaml``).

Hand-off between stages: a stage starts from its ``init_from``, else the previous stage's ``final/``
(``qlora_med.artifacts.run_dir.previous_final``); it loads that projector and, when that stage (or one
before it) trained LoRA adapters, *continues training those adapters*. We do not merge them into the base: the base is NF4, and merging into it
would re-quantize the sum and lose the adapter's contribution (see ``qlora-med merge`` for a proper
full-precision merge).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["STAGE_PRESETS", "StagePreset", "TrainSpec"]


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


STAGE_PRESETS: dict[str, StagePreset] = {
    "align": StagePreset("plain", TrainSpec("full", "lora"), 2e-4, 2e-3),
    "instruct": StagePreset("mistral_instruct", TrainSpec("full", "lora"), 2e-4, 2e-5),
    "vqa": StagePreset("mistral_instruct", TrainSpec("full", "lora"), 2e-4, 2e-5),
}
