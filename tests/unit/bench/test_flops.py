"""The bench's FLOPs formula: the planner's for equal-length samples, plus what only the bench counts."""

from __future__ import annotations

import pytest

from qlora_med.bench.flops import Trained, sample_flops, steps_flops
from qlora_med.plan.estimate import PRESETS, RunSpec, step_flops

SHAPE = PRESETS["llava-med-v1.5"]


def lora_params(rank: int) -> int:
    lin = SHAPE.llm.linears()
    return SHAPE.llm.layers * sum(rank * (i + o) for i, o in lin.values())


@pytest.mark.parametrize("ckpt", [True, False])
def test_matches_the_planner_for_full_length_samples(ckpt):
    length, rank = 2048, 64
    model, hardware = sample_flops(SHAPE, length, Trained(lora_llm=lora_params(rank), checkpointing=ckpt))
    planner = step_flops(SHAPE, RunSpec(micro_batch=1, seq_len=length, lora_rank=rank, grad_checkpointing=ckpt))
    vis = SHAPE.vision
    vision_attention = (vis.patches + 1) * 4 * (vis.patches + 1) * vis.hidden * vis.layers  # the planner omits it
    assert hardware == pytest.approx(planner + vision_attention, rel=1e-9)
    assert (hardware > model) is ckpt


def test_per_sample_attention_and_what_trl_adds():
    trained = Trained(lora_llm=lora_params(16))
    short, long = sample_flops(SHAPE, 500, trained)[0], sample_flops(SHAPE, 2000, trained)[0]
    assert long > 4 * short  # attention grows with each sample's own length
    batches = [{"lengths": [500, 2000]}, {"lengths": [500]}]
    assert steps_flops(SHAPE, batches, trained)[0] == pytest.approx(2 * short + long)
    trl_like = Trained(lora_llm=lora_params(16), lora_vision=10**7, lora_projector=10**5, projector_full=False,
                       vision_checkpointing=True)  # fmt: skip
    assert sample_flops(SHAPE, 500, trl_like)[0] > short  # backward through the vision tower too


def test_trained_parts_are_read_from_parameter_names():
    names = {"base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.default.weight": 100,
             "base_model.model.model.vision_tower.encoder.layers.0.mlp.fc1.lora_B.default.weight": 10,
             "base_model.model.model.multi_modal_projector.linear_1.weight": 5}  # fmt: skip
    trained = Trained.from_result(names, checkpointing=True)
    assert (trained.lora_llm, trained.lora_vision, trained.projector_full) == (100, 10, True)
    assert trained.vision_checkpointing
