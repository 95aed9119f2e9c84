"""Run curriculum stages: build model and data, hand them to the trainer, save ``final/``.

A stage whose ``final/`` exists is skipped; an unfinished stage resumes from its last complete
checkpoint. Each stage starts from the previous stage's ``final/`` (or ``init_from``): projector,
and adapters (see ``qlora_med.train.trainable``). What ``final/`` records about the stage is built in
``qlora_med.train.report``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from qlora_med.artifacts.adapter import save_trainable
from qlora_med.artifacts.run_dir import previous_final, stage_dir
from qlora_med.config.files import validate_paths
from qlora_med.config.loader import save_resolved
from qlora_med.config.schema import RecipeConfig, StageConfig
from qlora_med.data.build import build_stage_dataset
from qlora_med.data.collate import VisionCollator
from qlora_med.data.packing import PaddingFreeCollator
from qlora_med.io import atomic_dir, atomic_write_text
from qlora_med.model.build import base_model_dir
from qlora_med.model.family import chat_format, image_spec
from qlora_med.model.load import load_model, resolve_compute_dtype
from qlora_med.patches.select import apply_kernels, resolve_padding_free_setting
from qlora_med.prompts.templates import tokenizer_mode
from qlora_med.prompts.tokenization import save_training_tokenizer
from qlora_med.train.autobatch import resolve_batch
from qlora_med.train.checkpointing import resolve_checkpointing, with_checkpointing
from qlora_med.train.distributed import check_launch, is_main_process, launched_ranks, main_process_first
from qlora_med.train.lock import run_lock
from qlora_med.train.oom import BatchPlan, train_with_oom_fallback
from qlora_med.train.report import plot_loss, stage_record
from qlora_med.train.settings import changed_settings, check_unchanged, set_aside
from qlora_med.train.signals import Interrupted, StopOnSignal
from qlora_med.train.trainable import check_continued_adapter, setup_trainable

logger = logging.getLogger(__name__)


def train_stage(recipe: RecipeConfig, stage: StageConfig) -> dict:
    """Train one stage (resuming if a checkpoint exists) and write its ``final/``; returns stage.json."""
    from transformers import set_seed

    from qlora_med.train.trainer import StageTrainer, sft_config

    out = stage_dir(recipe, stage)
    final = out / "final"
    previous = previous_final(recipe, stage)
    check_continued_adapter(stage, recipe.lora, previous)  # before any model is loaded
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(recipe, out / "resolved_config.yaml")
    start = time.time()

    set_seed(recipe.seed)  # adapter init and dropout are reproducible across runs
    compute_dtype = resolve_compute_dtype(recipe.model.compute_dtype)
    with main_process_first():  # rank 0 builds tiny/composed models once; the others reuse them
        base_dir = base_model_dir(recipe.model)
    model, processor = load_model(recipe.model, base_dir, compute_dtype)
    stage = dataclasses.replace(stage, padding_free=resolve_padding_free_setting(stage.padding_free, model))
    plan = BatchPlan(*resolve_batch(recipe, stage, launched_ranks()[1], base_dir))
    checkpointing = resolve_checkpointing(recipe, stage, launched_ranks()[1], plan.micro_batch, plan.accumulation,
                                          base_dir)
    stage = with_checkpointing(stage, checkpointing)  # a bool from here on: model, trainer and stage.json
    model = setup_trainable(model, stage.train, recipe.lora, previous, stage.gradient_checkpointing,
                            checkpointing.layers)
    kernels = apply_kernels(model, recipe.kernels, stage.padding_free)  # logs which path runs

    images = image_spec(model.config, processor, recipe.model.image_size, recipe.model.image_token)
    logger.info("images: %s", images.describe())
    chat = chat_format(processor, images) if stage.template == "chat_template" else None
    dataset, stats = build_stage_dataset(
        stage, processor, images.tokens, processor.tokenizer.convert_ids_to_tokens(images.image_token_id),
        recipe.seed, Path(recipe.model.cache_dir) / "data", chat=chat,
    )
    logger.info("stage %s: %d samples (template %s): %s", stage.name, len(dataset), stage.template, stats.summary())

    stop = StopOnSignal()

    def make_trainer(plan: BatchPlan) -> StageTrainer:
        args = sft_config(stage, out, recipe.seed, compute_dtype, recipe.report_to)
        args.per_device_train_batch_size = plan.micro_batch
        args.gradient_accumulation_steps = plan.accumulation
        collator = VisionCollator(processor, recipe.model.image_aspect, stats.on_bad_image, images=images)
        return StageTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=PaddingFreeCollator(collator) if kernels.padding_free else collator,
            processing_class=processor,
            projector_lr=stage.projector_lr,
            save_total_limit=stage.save_total_limit,
            loss_mode=kernels.loss,
            callbacks=[stop],
        )

    try:
        trainer, plan = train_with_oom_fallback(make_trainer, plan, out)
    finally:
        stop.restore()  # also when training raised: the caller's Ctrl-C handling comes back
    if stop.received is not None:
        step = trainer.state.global_step
        raise Interrupted(f"stage {stage.name}: stopped by {stop.received} after step {step}; checkpoint "
                          f"{out / f'checkpoint-{step}'} is saved: run the same command to resume from it")

    info = stage_record(recipe, stage, trainer=trainer, model=model, base_dir=base_dir, previous=previous,
                        compute_dtype=compute_dtype, plan=plan, samples=len(dataset), stats=stats, kernels=kernels,
                        wall_time_s=time.time() - start, image_side=images.side,
                        checkpointing=checkpointing.summary())
    if trainer.accelerator.is_main_process:
        with atomic_dir(final) as tmp:
            save_trainable(trainer.accelerator.unwrap_model(trainer.model), tmp)
            processor.save_pretrained(tmp)
            # plain AutoProcessor on final/ (and on merges and exports of it) tokenizes as training did
            save_training_tokenizer(processor.tokenizer, tokenizer_mode(stage.template), tmp)
            save_resolved(recipe, tmp / "resolved_config.yaml")
            atomic_write_text(tmp / "log_history.json", json.dumps(trainer.state.log_history, indent=1))
            atomic_write_text(tmp / "stage.json", json.dumps(info, indent=1))
            plot_loss(trainer.state.log_history, tmp / "loss.png", f"{stage.name} ({stage.kind})")
    trainer.accelerator.wait_for_everyone()  # the next stage starts from final/ on every rank
    logger.info("stage %s done: loss %.4f -> %.4f over %d steps; artefacts in %s",
                stage.name, info["loss_first"] or float("nan"), info["loss_last"] or float("nan"),
                info["steps"], final)
    return info


def _check_stage_folders(recipe: RecipeConfig, stages: list[StageConfig], restart: bool) -> None:
    restarted = False
    for stage in stages:
        folder = stage_dir(recipe, stage)
        if not folder.is_dir():
            continue
        if restarted and restart:  # it started from a stage that now trains again
            aside = set_aside(folder)
            logger.warning("stage %s: an earlier stage trains again; its previous folder is kept as %s",
                           stage.name, aside)
            continue
        state = "finished" if (folder / "final").is_dir() else "started"
        restarted |= check_unchanged(folder, recipe, stage, state, restart)


def run_recipe(recipe: RecipeConfig, only: str | None = None, restart_changed: bool = False) -> list[dict]:
    """Run every stage in order (or only ``only``), skipping finished ones. A stage folder trained with other
    weight-shaping settings is refused, or with ``restart_changed`` set aside and trained again (with every
    later stage of this run, which started from it)."""
    from qlora_med.train.trainer import check_tracker

    check_launch()
    check_tracker(recipe.report_to)
    validate_paths(recipe)
    if is_main_process():
        with run_lock(Path(recipe.output_dir)):
            return _run_stages(recipe, only, restart_changed)
    return _run_stages(recipe, only, restart_changed)


def _run_stages(recipe: RecipeConfig, only: str | None, restart_changed: bool) -> list[dict]:
    stages = [recipe.stage(only)] if only else recipe.stages
    with main_process_first():  # rank 0 sets folders aside first; the others then find them gone
        _check_stage_folders(recipe, stages, restart_changed and is_main_process())
    others = [s.name for s in recipe.stages if s not in stages and changed_settings(stage_dir(recipe, s), recipe, s)]
    if is_main_process():
        Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
        if others:  # the run-level record must not claim settings those stages were not trained with
            logger.warning("not updating %s/resolved_config.yaml: stage(s) %s were trained with other settings",
                           recipe.output_dir, ", ".join(others))
        else:
            save_resolved(recipe, Path(recipe.output_dir) / "resolved_config.yaml")
    for stage in stages:  # an init_from adapter is checked now, not after the stages before it have trained
        if stage.init_from is not None and not (stage_dir(recipe, stage) / "final").is_dir():
            check_continued_adapter(stage, recipe.lora, Path(stage.init_from))
    results = []
    for stage in stages:
        final = stage_dir(recipe, stage) / "final"
        if final.is_dir():
            logger.info("stage %s already finished (%s): skipping", stage.name, final)
            results.append(json.loads((final / "stage.json").read_text()))
            continue
        results.append(train_stage(recipe, stage))
    return results
