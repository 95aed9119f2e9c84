"""Per-layer gradient checkpointing: the first k decoder layers only, the same gradients, less saved for backward,
and the planner's per-layer saving; a run whose budget needs one of the tiny model's two layers trains that way.

Model: the session's tiny LLaVA (Mistral 2 x 64, NF4 + LoRA r8 with dropout 0.05, fp32). Saved-for-backward bytes
are what autograd's pack hook sees (distinct tensors); a checkpointed layer saves nothing there but its input. The
planner's full-layer bytes (``_layer_activation_bytes``) are a per-layer mean of the measured saving within 15%
(observed: 1.32 MB planned, 1.21 MB measured).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora_med.config.loader import load_recipe
from qlora_med.config.schema import LoraConfig, ModelConfig
from qlora_med.config.stages import TrainSpec
from qlora_med.model.load import load_model
from qlora_med.plan.estimate import GIB, RunSpec, _layer_activation_bytes, estimate_memory
from qlora_med.plan.recipe import run_for_stage, shape_for_run, shape_from_config_dict
from qlora_med.train import checkpointing
from qlora_med.train.trainable import setup_trainable

ROOT = Path(__file__).resolve().parents[3]
LENGTH, BATCH = 64, 3


def _batch(model, pad_id: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 30000, (BATCH, LENGTH), generator=g)
    ids[:, 0], ids[:, 1:17] = 1, model.config.image_token_index  # BOS, 16 image tokens
    labels = ids.clone()
    labels[:, :24] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(BATCH, 3, 56, 56, generator=g)}  # fmt: skip


def _step(tiny_dir: Path, layers: int) -> tuple[int, dict[str, torch.Tensor], list[bool], list[bool]]:
    """One forward + backward with the first ``layers`` decoder layers checkpointed: saved bytes, LoRA/projector
    gradients, the decoder's and the vision tower's checkpointing flags."""
    model, processor = load_model(ModelConfig(name_or_path=str(tiny_dir), compute_dtype="fp32"), tiny_dir, torch.float32)
    torch.manual_seed(0)
    model = setup_trainable(model, TrainSpec(), LoraConfig(r=8, dropout=0.05), None, layers > 0, layers)
    model.train()
    saved: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    torch.manual_seed(1)  # the same dropout masks in every run (checkpointing replays the RNG state)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**_batch(model, processor.tokenizer.pad_token_id)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    base = model.get_base_model()
    decoder = [layer.gradient_checkpointing for layer in base.get_decoder().layers]
    vision = [m.gradient_checkpointing for n, m in base.named_modules()
              if "vision_tower" in n and isinstance(m, GradientCheckpointingLayer)]
    return sum(saved.values()), grads, decoder, vision


@pytest.fixture(scope="module")
def steps(tiny_dir):
    return {k: _step(tiny_dir, k) for k in (0, 1, 2)}


def test_only_the_first_k_decoder_layers_are_checkpointed(steps):
    assert [steps[k][2] for k in (0, 1, 2)] == [[False, False], [True, False], [True, True]]
    assert [steps[k][3] for k in (0, 1, 2)] == [[False, False]] * 3  # the frozen tower is never checkpointed


def test_gradients_are_the_same_and_each_layer_saves_memory(steps):
    none, one, both = (steps[k][0] for k in (0, 1, 2))
    assert none > one > both
    reference = steps[0][1]
    assert any("lora_" in n for n in reference) and len(reference) == len(steps[1][1]) == len(steps[2][1])
    for k in (1, 2):
        for name, grad in reference.items():
            torch.testing.assert_close(steps[k][1][name], grad, rtol=0, atol=1e-7, msg=name)


def test_planned_saving_per_layer_matches_the_measured_one(steps, tiny_dir):
    shape = shape_from_config_dict(json.loads((tiny_dir / "config.json").read_text()))
    run = RunSpec(micro_batch=BATCH, seq_len=LENGTH, lora_rank=8, compute_dtype="fp32", device="cpu")
    planned = _layer_activation_bytes(shape.llm, run, 4, 4) * BATCH * LENGTH
    measured = (steps[0][0] - steps[2][0]) / 2
    assert measured == pytest.approx(planned, rel=0.15)


def test_a_budget_for_one_layer_trains_with_one_layer_checkpointed(tmp_path, tiny_dir, monkeypatch):
    """Through ``run_recipe``: auto picks 1 of 2 layers, the trainer keeps it (it would re-enable every layer),
    stage.json records it."""
    from qlora_med.train import trainer as trainer_module
    from qlora_med.train.runner import run_recipe

    recipe = yaml.safe_load((ROOT / "recipes" / "demo_cpu.yaml").read_text())
    stage = next(s for s in recipe["stages"] if s["name"] == "instruct")
    stage["data"] = {k: str(ROOT / v) for k, v in stage["data"].items()}
    stage.update(max_steps=2, logging_steps=1, save_steps=100, per_device_batch_size=2, gradient_checkpointing="auto",
                 padding_free=False)  # fmt: skip
    recipe["stages"] = [stage]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(path, [f"output_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_dir}"])
    fixed = dataclasses.replace(loaded.stages[0], per_device_batch_size=2, gradient_accumulation_steps=1,
                                global_batch_size=None, gradient_checkpointing=False)  # fmt: skip
    run, shape = run_for_stage(loaded, fixed, 1, "cpu"), shape_for_run(loaded, tiny_dir)
    one, none = (estimate_memory(shape, run.with_checkpointed(k, 2)).peak_bytes / GIB for k in (1, 0))
    monkeypatch.setattr(checkpointing, "device_memory_gib", lambda: ((one + none) / 2 / 0.9, "test RAM"))
    flags: list[list[bool]] = []
    real_step = trainer_module.StageTrainer.training_step

    def spy(self, model, *args, **kwargs):
        flags.append([layer.gradient_checkpointing for layer in model.get_base_model().get_decoder().layers])
        return real_step(self, model, *args, **kwargs)

    monkeypatch.setattr(trainer_module.StageTrainer, "training_step", spy)
    run_recipe(loaded)
    assert flags == [[True, False], [True, False]]
    info = json.loads((tmp_path / "run" / "instruct" / "final" / "stage.json").read_text())["gradient_checkpointing"]
    assert info["enabled"] is True and info["layers"] == 1 and info["of_layers"] == 2 and info["setting"] == "auto"
    assert info["planned_peak_gib"] == pytest.approx(one, abs=0.01) and info["device"] == "test RAM"
