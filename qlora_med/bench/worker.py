"""The kit's side of ``qlora-med bench``: one variant, one mix, in a fresh process (``python worker.py PAYLOAD.json``).

The stage is trained the way ``qlora-med run`` trains it (:func:`qlora_med.train.runner.train_stage`): ``load_model``
(NF4 LLM, fp32 projector), ``setup_trainable``, ``apply_kernels``, ``build_stage_dataset`` (the stage template's
rendering and masking, the Arrow cache), ``VisionCollator`` (images read from disk, padded to square) wrapped in
``PaddingFreeCollator`` when the stage says so, and ``StageTrainer``. Differences, all for the measurement: the
samples in order (``train_sampling_strategy="sequential"``: every variant sees the same batches), no checkpoints,
a callback timing each step, and a wrapper noting each collated batch's lengths. Measurement: :mod:`meter`.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from qlora_med.bench.meter import (  # the measuring stick, shared with the baseline and TRL workers
    StepMeter,
    training_summary,
)

TEMPLATES = {"align": "plain", "instruct": "mistral_instruct"}  # the formats the baseline writes by hand


class Recorder:
    """Wraps the stage's collator to note each batch's real lengths, padded size and labelled tokens."""

    def __init__(self, collator) -> None:
        self.collator, self.batches = collator, []

    def __call__(self, features):
        batch = self.collator(features)
        if "cu_seq_lens_q" in batch:  # padding-free: one packed row
            cu = batch["cu_seq_lens_q"].tolist()
            lengths = [b - a for a, b in zip(cu, cu[1:], strict=False)]
        else:
            lengths = batch["attention_mask"].sum(1).tolist()
        self.batches.append({"lengths": lengths, "padded": batch["input_ids"].numel(),
                             "labelled": int((batch["labels"] != -100).sum())})  # fmt: skip
        return batch

    def __getattr__(self, name: str):
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


def build_trainer(payload: dict, callbacks: list, workdir: Path):
    """The stage, model, kernels, dataset, collator and ``StageTrainer`` of one kit variant, as ``qlora-med run``
    builds them; returns (trainer, recorder, kernel setup, share of decoder layers checkpointed)."""
    from transformers import set_seed

    from qlora_med.config.schema import (
        DataConfig,
        KernelsConfig,
        LoraConfig,
        ModelConfig,
        RecipeConfig,
        StageConfig,
    )
    from qlora_med.data.build import build_stage_dataset
    from qlora_med.data.collate import VisionCollator
    from qlora_med.data.packing import PaddingFreeCollator
    from qlora_med.model.family import image_spec
    from qlora_med.model.load import load_model, resolve_compute_dtype
    from qlora_med.patches.select import apply_kernels, resolve_padding_free_setting
    from qlora_med.train.checkpointing import resolve_checkpointing, with_checkpointing
    from qlora_med.train.trainable import setup_trainable
    from qlora_med.train.trainer import StageTrainer, sft_config

    variant, mix = payload["variant"], payload["mix"]
    steps = payload["warmup"] + payload["steps"]
    stage = StageConfig(
        name=mix, kind="align" if mix == "align" else "instruct", template=TEMPLATES[mix],
        data=DataConfig(path=payload["records"], image_folder=payload["images"],
                        max_records=payload["batch_size"] * steps),
        max_steps=steps, per_device_batch_size=payload["batch_size"], max_length=payload["max_length"],
        save_steps=10**6, logging_steps=1, warmup_ratio=0.0, padding_free=variant["padding_free"],
        gradient_checkpointing=variant["gradient_checkpointing"],
    )  # fmt: skip
    kernels = KernelsConfig(liger=variant["liger"], nf4_lora=variant["nf4_lora"], loss=variant["loss"])
    lora = LoraConfig(r=payload["lora"]["r"], alpha=payload["lora"]["alpha"], dropout=payload["lora"]["dropout"])
    model_cfg = ModelConfig(name_or_path=payload["model_dir"])
    dtype = resolve_compute_dtype(model_cfg.compute_dtype)
    set_seed(payload["seed"])
    model, processor = load_model(model_cfg, Path(payload["model_dir"]), dtype)
    recipe = RecipeConfig(output_dir=str(workdir / "out"), model=model_cfg, stages=[stage], lora=lora, kernels=kernels)
    stage = replace(stage, padding_free=resolve_padding_free_setting(stage.padding_free, model))  # as the runner
    checkpointing = resolve_checkpointing(recipe, stage, 1, stage.per_device_batch_size, 1, Path(payload["model_dir"]))
    stage = with_checkpointing(stage, checkpointing)
    total = len(model.get_decoder().layers)
    layers = checkpointing.layers or total
    if variant.get("checkpoint_share", 1.0) < 1:
        layers = max(1, round(total * variant["checkpoint_share"]))
    model = setup_trainable(model, stage.train, lora, None, stage.gradient_checkpointing, layers)
    share = layers / total if stage.gradient_checkpointing else 0.0  # of the decoder layers checkpointed
    setup = apply_kernels(model, kernels, stage.padding_free)
    images = image_spec(model.config, processor, model_cfg.image_size, model_cfg.image_token)
    dataset, _ = build_stage_dataset(stage, processor, images.tokens, model_cfg.image_token,
                                     payload["seed"], workdir / "data")  # fmt: skip
    collator = VisionCollator(processor, model_cfg.image_aspect, images=images)
    recorder = Recorder(PaddingFreeCollator(collator) if setup.padding_free else collator)
    args = sft_config(stage, workdir / "out", payload["seed"], dtype, "none")
    args.train_sampling_strategy = "sequential"
    args.disable_tqdm = True
    trainer = StageTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=recorder, processing_class=processor,
        projector_lr=stage.projector_lr, save_total_limit=1, loss_mode=setup.loss, callbacks=callbacks,
    )  # fmt: skip
    return trainer, recorder, setup, share


def run(payload: dict) -> dict:
    import bitsandbytes  # noqa: F401 - every library imported before the RSS baseline
    import peft  # noqa: F401
    import torch
    import trl  # noqa: F401
    from transformers import LlavaForConditionalGeneration, TrainerCallback  # noqa: F401

    import qlora_med.train.trainer  # noqa: F401 - the kit's own imports too (Liger, TRL, datasets)

    meter = StepMeter(payload["warmup"])

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            meter.step_done(state.global_step)

    with tempfile.TemporaryDirectory() as tmp:
        trainer, recorder, setup, share = build_trainer(payload, [Timer()], Path(tmp))
        trainer.train()
    return {
        **meter.result(), **training_summary(trainer), "batches": recorder.batches,
        "checkpointing": share, "loss_on": "answer tokens", "kernels": setup.summary(),
        "torch_version": torch.__version__,
    }  # fmt: skip


if __name__ == "__main__":  # python qlora_med/bench/worker.py PAYLOAD.json
    logging.basicConfig(level=logging.WARNING)
    _payload = json.loads(Path(sys.argv[1]).read_text())
    Path(_payload["result"]).write_text(json.dumps(run(_payload)))
