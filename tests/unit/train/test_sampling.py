"""``sampling``: padded stages draw micro-batches of similar lengths by default (less padding, as LLaVA's own
scripts group); packed stages and explicit ``random`` keep the Trainer's random order."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from qlora_med.config.loader import load_recipe
from qlora_med.errors import ConfigError
from qlora_med.train.trainer import sampling_strategy, sft_config

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "recipes" / "demo_cpu.yaml"


def _stage(*overrides: str, packed: bool):
    stage = load_recipe(DEMO, list(overrides)).stage("align")
    return dataclasses.replace(stage, padding_free=packed)  # as the runner resolves auto


def test_auto_groups_padded_batches_only():
    assert sampling_strategy(_stage(packed=False)) == "group_by_length"
    assert sampling_strategy(_stage(packed=True)) == "random"
    assert sampling_strategy(_stage("stages.align.sampling=random", packed=False)) == "random"
    assert sampling_strategy(_stage("stages.align.sampling=group_by_length", packed=True)) == "group_by_length"
    with pytest.raises(ConfigError, match=r"stages\.align\.sampling: 'sorted' is not one of"):
        load_recipe(DEMO, ["stages.align.sampling=sorted"])


def _padding(lengths: np.ndarray, order: list[int], batch: int) -> float:
    """Tokens computed per real token when ``order`` is cut into right-padded micro-batches."""
    rows = [lengths[order[i : i + batch]] for i in range(0, len(order), batch)]
    return sum(len(r) * r.max() for r in rows) / lengths.sum()


def test_grouped_sampler_pads_less_than_random(tiny_dir, tmp_path):
    from qlora_med.config.schema import ModelConfig
    from qlora_med.model.load import load_model
    from qlora_med.train.trainer import StageTrainer

    lengths = np.random.default_rng(0).lognormal(np.log(300), 0.7, 400).astype(np.int64).clip(40, 2048)
    data = datasets.Dataset.from_dict({"num_tokens": lengths.tolist(), "id": list(range(len(lengths)))})
    model, processor = load_model(ModelConfig(name_or_path=str(tiny_dir), quantization="none"), tiny_dir, torch.float32)
    padded = {}
    for packed in (False, True):
        stage = _stage("stages.align.per_device_batch_size=4", packed=packed)
        args = sft_config(stage, tmp_path / str(packed), 0, torch.float32, "none")
        trainer = StageTrainer(model=model, args=args, train_dataset=data, data_collator=lambda rows: rows,
                               processing_class=processor, projector_lr=1e-3, save_total_limit=1)
        order = list(trainer._get_train_sampler())
        assert sorted(order) == list(range(len(lengths)))  # every sample once
        padded[packed] = _padding(lengths, order, 4)
    assert padded[False] < 1.2 and padded[True] > padded[False] + 0.3, padded  # observed 1.10 vs 1.81
