"""The ``kernels:`` recipe switch and padding-free batches through the real training path.

Each run: ``set_seed``, ``load_model`` (tiny LLaVA from the session fixture: NF4 LLM, fp32 compute),
``setup_trainable`` (LoRA r16 with dropout 0.05 + trainable fp32 projector, gradient checkpointing), then
``apply_kernels`` and ``StageTrainer`` for 4 optimizer steps of 3 samples on synthetic, deterministic batches
(variable lengths, random pixels). Same seed, so the same adapter init, data order and dropout masks.

Tolerance (fp32): per-step losses of every kernel / loss / packing combination within 1e-5 relative of the
plain path (PEFT layers, full logits, padded batches); observed <= 2e-7 (sums in a different order).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import datasets
import pytest
import torch

from qlora_med.config.loader import load_recipe
from qlora_med.config.schema import KernelsConfig
from qlora_med.data.collate import pad_right
from qlora_med.data.packing import PaddingFreeCollator
from qlora_med.errors import ConfigError
from qlora_med.patches.select import apply_kernels, resolve_padding_free_setting

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "recipes" / "demo_cpu.yaml"
IMAGE_TOKENS = 16


class SyntheticCollator:
    """Right-padded batches like ``VisionCollator``'s, pixels drawn from a generator seeded by the sample id."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.skipped = 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels, mask = pad_right([f["input_ids"] for f in features], [f["labels"] for f in features], self.pad_id)
        pixels = torch.stack(
            [torch.randn(3, 56, 56, generator=torch.Generator().manual_seed(f["id"])) for f in features]
        )
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def dataset(image_token: int, n: int = 12) -> datasets.Dataset:
    g = torch.Generator().manual_seed(5)
    rows = {"id": [], "input_ids": [], "labels": []}
    for i in range(n):
        length = int(torch.randint(IMAGE_TOKENS + 8, 64, (1,), generator=g))
        ids = torch.randint(3, 30000, (length,), generator=g)
        ids[0] = 1
        ids[1 : 1 + IMAGE_TOKENS] = image_token
        labels = ids.clone()
        labels[: IMAGE_TOKENS + 4] = -100
        rows["id"].append(i)
        rows["input_ids"].append(ids.tolist())
        rows["labels"].append(labels.tolist())
    return datasets.Dataset.from_dict(rows)


def train(tiny_dir: Path, tmp_path: Path, overrides: list[str]) -> tuple[list[float], dict, dict]:
    """Per-step losses, the kernel summary and the last logged metrics of a 4-step StageTrainer run."""
    from transformers import set_seed

    from qlora_med.model.load import load_model
    from qlora_med.train.trainable import setup_trainable
    from qlora_med.train.trainer import StageTrainer, sft_config

    steps = ["stages.align.max_steps=4", "stages.align.per_device_batch_size=3", "stages.align.logging_steps=1",
             "stages.align.warmup_ratio=0.0"]  # fmt: skip
    recipe = load_recipe(DEMO, [f"model.name_or_path={tiny_dir}", *steps, *overrides])
    stage = recipe.stage("align")
    set_seed(recipe.seed)
    model, processor = load_model(recipe.model, tiny_dir, torch.float32)
    stage = dataclasses.replace(stage, padding_free=resolve_padding_free_setting(stage.padding_free, model))  # runner
    model = setup_trainable(model, stage.train, recipe.lora, None, stage.gradient_checkpointing)
    setup = apply_kernels(model, recipe.kernels, stage.padding_free)
    collator = SyntheticCollator(processor.tokenizer.pad_token_id)
    trainer = StageTrainer(
        model=model, args=sft_config(stage, tmp_path, recipe.seed, torch.float32, "none"),
        train_dataset=dataset(model.config.image_token_index),
        data_collator=PaddingFreeCollator(collator) if stage.padding_free else collator,
        processing_class=processor, projector_lr=stage.projector_lr, save_total_limit=1, loss_mode=setup.loss,
    )  # fmt: skip
    trainer.args.save_strategy = "no"
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return [h["loss"] for h in logs], setup.summary(), logs[-1]


PADDED = ["stages.align.padding_free=false", "stages.align.sampling=random"]  # padded, in the packed runs' order
PLAIN = ["kernels.nf4_lora=off", "kernels.loss=full", "kernels.liger=off", *PADDED]
NO_DROPOUT = ["lora.dropout=0.0"]  # packed rows draw other LoRA dropout masks than padded batches


@pytest.fixture(scope="module")
def plain(tiny_dir, tmp_path_factory):
    return train(tiny_dir, tmp_path_factory.mktemp("plain"), PLAIN)


@pytest.fixture(scope="module")
def plain_no_dropout(tiny_dir, tmp_path_factory):
    return train(tiny_dir, tmp_path_factory.mktemp("plain"), PLAIN + NO_DROPOUT)


def test_plain_path_resolves_and_logs_metrics(plain):
    losses, summary, last = plain
    assert summary == {"liger": False, "nf4_lora": "off", "nf4_lora_modules": 0, "loss": "full",
                       "padding_free": False, "chunk_size": None}  # fmt: skip
    assert len(losses) == 4 and all(0 < loss < 20 for loss in losses)
    assert 0 <= last["mean_token_accuracy"] <= 1 and last["entropy"] > 0 and last["num_tokens"] > 0


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (NO_DROPOUT, {"nf4_lora": "torch", "loss": "chunked", "padding_free": True}),  # the defaults on CPU
        (
            ["kernels.loss=trl", "kernels.nf4_lora=on", *PADDED],
            {"nf4_lora": "torch", "loss": "trl", "padding_free": False},
        ),
        (
            ["stages.align.padding_free=true", "kernels.chunk_size=16", *NO_DROPOUT],
            {"nf4_lora": "torch", "loss": "chunked", "padding_free": True},
        ),
    ],
    ids=["auto", "trl_loss", "padding_free"],
)
def test_kernels_on_train_like_plain_path(tiny_dir, tmp_path, request, overrides, expected):
    plain = request.getfixturevalue("plain_no_dropout" if expected["padding_free"] else "plain")
    losses, summary, last = train(tiny_dir, tmp_path, overrides)
    assert {k: summary[k] for k in expected} == expected and summary["nf4_lora_modules"] == 14  # 7 x 2 layers
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain[0]), rtol=1e-5, atol=0)
    assert last["num_tokens"] == plain[2]["num_tokens"]  # padding excluded in both
    if summary["loss"] == "trl":
        torch.testing.assert_close(
            last["mean_token_accuracy"], plain[2]["mean_token_accuracy"], rtol=1e-4, atol=0
        )
    if summary["loss"] == "chunked":
        assert "mean_token_accuracy" not in last


def test_kernel_switches_validate_in_recipes():
    recipe = load_recipe(DEMO, ["kernels.loss=trl", "kernels.nf4_lora=off", "kernels.chunk_size=512",
                                "stages.instruct.padding_free=true"])  # fmt: skip
    assert recipe.kernels == KernelsConfig(liger="auto", nf4_lora="off", loss="trl", chunk_size=512)
    assert recipe.stage("instruct").padding_free is True and recipe.stage("align").padding_free == "auto"
    assert load_recipe(DEMO).kernels == KernelsConfig()
    with pytest.raises(ConfigError, match=r"kernels\.loss: 'chunkd' is not one of .*did you mean 'chunked'"):
        load_recipe(DEMO, ["kernels.loss=chunkd"])
    assert load_recipe(DEMO, ["kernels.liger=off"]).kernels.liger == "off"  # YAML 1.1 reads off as false
    with pytest.raises(ConfigError, match=r"kernels\.liger: 'maybe' is not one of"):
        load_recipe(DEMO, ["kernels.liger=maybe"])
    with pytest.raises(ConfigError, match=r"kernels\.nf4_lora: 'on' needs model\.quantization: nf4"):
        load_recipe(DEMO, ["kernels.nf4_lora=on", "model.quantization=none"])
    with pytest.raises(ConfigError, match=r"kernels\.chunk_size must be positive"):
        load_recipe(DEMO, ["kernels.chunk_size=0"])
    with pytest.raises(ConfigError, match=r"stages\.align\.padding_free: .*true.*false.*auto"):
        load_recipe(DEMO, ["stages.align.padding_free=maybe"])
    with pytest.raises(ConfigError, match=r"unknown key 'kernels\.fused'"):
        load_recipe(DEMO, ["kernels.fused=on"])


def test_apply_kernels_logs_the_path(tiny_dir, caplog):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir)
    with caplog.at_level(logging.INFO, logger="qlora_med"):
        setup = apply_kernels(model, KernelsConfig(), padding_free=True)
    assert (
        "kernels: liger off (auto) | fused NF4+LoRA torch backend on 0 layers | loss chunked (auto)"
        in caplog.text
    )
    assert "mean_token_accuracy metrics are not computed" in caplog.text
    assert "padding-free batches: packed rows" in caplog.text
    setup.undo()
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert model.config.text_config._attn_implementation == "sdpa"
