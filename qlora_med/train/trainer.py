"""TRL ``SFTTrainer`` configured for a curriculum stage.

What it changes, and why:
- optimizer param groups: LoRA adapters and the projector each get their own learning rate;
- trainable weights stay fp32 master weights (TRL casts every trainable parameter of a quantized
  model to bf16, which would also make the projector bf16 and is ~10x slower on CPUs);
- checkpoints hold only the adapter + projector (+ optimizer, scheduler, RNG, trainer state), are
  marked complete only after everything is written, and rotation never deletes the last complete one;
- a stage whose LLM is frozen (projector only) is allowed on a quantized base: nothing quantized trains;
- the loss path is chosen by ``kernels.loss`` (``qlora_med.patches.select``): TRL's fused LM head, our chunked
  linear cross-entropy (patched into the model's forward), or plain logits.

This is the one module that touches private TRL/transformers names; ``PRIVATE_API`` lists them and
``tests/unit/train/test_private_api.py`` fails, naming the attribute and the versions, when an upgrade
removes one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, Trainer
from trl import SFTConfig, SFTTrainer

from qlora_med.artifacts.adapter import load_trainable, save_trainable
from qlora_med.config.schema import StageConfig
from qlora_med.errors import ConfigError
from qlora_med.model.family import connector_parameters, family_of_config
from qlora_med.train.checkpoints import mark_complete, rotate_checkpoints

logger = logging.getLogger(__name__)


class PrivateName(NamedTuple):
    """A private TRL/transformers name this module relies on."""

    owner: type
    name: str
    on_instance: bool  # set in the owner's __init__ rather than defined on the class
    why: str


PRIVATE_API: tuple[PrivateName, ...] = (
    PrivateName(Trainer, "_save", False, "overridden: saves hold adapter + projector only, never the frozen base"),
    PrivateName(Trainer, "_load_from_checkpoint", False, "overridden: resume restores adapter + projector in place"),
    PrivateName(Trainer, "_save_checkpoint", False,
                "overridden: mark a checkpoint COMPLETE, then rotate; save_checkpoint_now calls it on OOM"),
    PrivateName(PreTrainedModel, "_hf_peft_config_loaded", False,
                "set on a quantized base so transformers lets a projector-only stage train"),
    PrivateName(SFTTrainer, "_metrics", True, "per-mode metric lists SFTTrainer.log averages; our loss paths fill them"),
    PrivateName(SFTTrainer, "_total_train_tokens", True, "TRL's running token count, logged as num_tokens"),
)


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_tracker(report_to: str) -> None:
    """A ConfigError naming the package to install when ``report_to``'s tracker is missing."""
    import importlib.util

    package = TRACKER_PACKAGES.get(report_to)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(f"report_to: {report_to} needs the `{package}` package, which is not installed: "
                          f"`pip install {package}` (or `pip install -e .[tracking]`), or set report_to: none")


def sampling_strategy(stage: StageConfig) -> str:
    """The Trainer's ``train_sampling_strategy`` for the stage's ``sampling`` (``auto``: grouped by length when
    the stage's batches are padded, which needs ``padding_free`` resolved to a bool)."""
    if stage.sampling != "auto":
        return stage.sampling
    return "random" if stage.padding_free is True or stage.per_device_batch_size == 1 else "group_by_length"


def sft_config(stage: StageConfig, output_dir: Path, seed: int, compute_dtype: torch.dtype, report_to: str) -> SFTConfig:
    """The SFTConfig for a stage (our collator does templating, masking and truncation; lengths for grouped
    sampling are the encoded ``num_tokens``)."""
    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=stage.per_device_batch_size,
        gradient_accumulation_steps=stage.gradient_accumulation_steps,
        num_train_epochs=stage.num_epochs,
        max_steps=stage.max_steps,
        learning_rate=stage.learning_rate,
        lr_scheduler_type=stage.lr_scheduler,
        warmup_steps=stage.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=stage.weight_decay,
        optim=stage.optim,
        max_grad_norm=stage.max_grad_norm,
        logging_steps=stage.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=stage.save_steps,
        save_total_limit=None,  # rotation is ours, after a checkpoint is marked complete
        seed=seed,
        data_seed=seed,
        use_cpu=not on_gpu,  # also makes `torchrun` on CPU a real gloo process group
        bf16=on_gpu and compute_dtype == torch.bfloat16,
        fp16=on_gpu and compute_dtype == torch.float16,
        activation_checkpointing=False,  # setup_trainable enabled it on exactly the chosen layers; the Trainer
        # would enable it again on every layer at train() (its every_n_layers cannot say "the first k")
        dataloader_num_workers=stage.dataloader_workers,
        train_sampling_strategy=sampling_strategy(stage),
        length_column_name="num_tokens",
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # truncation already done, image tokens kept
        report_to=report_to,
        disable_tqdm=False,
    )


class StageTrainer(SFTTrainer):
    """SFTTrainer with projector param group, fp32 trainables and adapter+projector checkpoints."""

    def __init__(self, *args, projector_lr: float, save_total_limit: int, loss_mode: str = "trl", **kwargs) -> None:
        if loss_mode not in ("trl", "chunked", "full"):
            raise ValueError(f"loss_mode must be trl, chunked or full, got {loss_mode!r}")
        model = kwargs["model"]
        dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(base, "is_quantized", False) and not hasattr(model, "peft_config"):
            # transformers refuses to train a quantized model without adapters; here only the
            # full-precision projector trains, which is exactly what the paper's stage 1 does.
            # Private (PRIVATE_API): the flag transformers' quantized-training check reads.
            base._hf_peft_config_loaded = True
        super().__init__(*args, **kwargs)
        for name, param in self.model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])
        self.projector_lr = projector_lr
        self.keep_checkpoints = save_total_limit
        self.loss_mode = loss_mode

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``trl``: SFTTrainer's fused LM head. ``chunked`` (forward patched by ``patches.select``) and ``full``:
        the model's own loss through ``Trainer.compute_loss``, plus TRL's token count; ``full`` also logs entropy
        and token accuracy from its logits, ``chunked`` has none to log."""
        if self.loss_mode == "trl":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False  # also keeps transformers' packed-sequence mask detection working
        loss, outputs = Trainer.compute_loss(self, model, inputs, True, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        logits = getattr(outputs, "logits", None)
        if logits is not None:
            self._log_logit_metrics(logits.detach(), inputs["labels"], mode)
        if mode == "train":
            if "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            else:  # padding-free: one packed row
                tokens = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
            # Private (PRIVATE_API): TRL's token counter and metric store, kept as SFTTrainer's own loss fills them
            self._total_train_tokens += self.accelerator.gather_for_metrics(tokens).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

    def _log_logit_metrics(self, logits: torch.Tensor, labels: torch.Tensor, mode: str) -> None:
        """TRL's entropy and mean_token_accuracy, from full logits at the labelled (shifted) positions."""
        shifted = labels[..., 1:].to(logits.device)
        mask = shifted != -100
        picked = logits[..., :-1, :][mask].float()
        n = self.accelerator.gather_for_metrics(mask.sum()).sum()
        if picked.numel():
            logp = torch.log_softmax(picked, dim=-1)
            entropy = -(logp.exp() * logp).sum(-1).sum()
            correct = (picked.argmax(-1) == shifted[mask]).sum()
        else:
            entropy = correct = torch.zeros((), device=logits.device)
        entropy = self.accelerator.gather_for_metrics(entropy).sum()
        correct = self.accelerator.gather_for_metrics(correct).sum()
        # Private (PRIVATE_API): SFTTrainer.log averages and logs these lists
        self._metrics[mode]["entropy"].append((entropy / n).item() if n > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / n).item() if n > 0 else 0.0)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        projector_ids = {id(p) for p in connector_parameters(model, family_of_config(model.config)).values()}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        adapter = [p for _n, p in named if id(p) not in projector_ids]
        projector = [p for _n, p in named if id(p) in projector_ids]
        groups = []
        if adapter:
            groups.append({"params": adapter, "lr": self.args.learning_rate, "weight_decay": self.args.weight_decay})
        if projector:
            groups.append({"params": projector, "lr": self.projector_lr, "weight_decay": self.args.weight_decay})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        logger.info(
            "optimizer %s: %d adapter tensors @ lr %g, %d projector tensors @ lr %g",
            optimizer_cls.__name__, len(adapter), self.args.learning_rate, len(projector), self.projector_lr,
        )
        return self.optimizer

    # Private overrides (PRIVATE_API): transformers.Trainer's save/resume hooks have no public equivalent.
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write only adapter + projector (checkpoints and ``save_model``), never the frozen (NF4) base."""
        if self.args.should_save:
            save_trainable(self.accelerator.unwrap_model(self.model), Path(output_dir or self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore what ``_save`` wrote into the live model (the base is loaded fresh, not from the checkpoint)."""
        load_trainable(model if model is not None else self.model, Path(resume_from_checkpoint))
        logger.info("resumed adapter and projector from %s", resume_from_checkpoint)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, then ``COMPLETE`` once every file is written, then rotation (ours)."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            mark_complete(checkpoint)
            rotate_checkpoints(Path(self.args.output_dir), self.keep_checkpoints)

    def save_checkpoint_now(self) -> None:
        """Save a complete checkpoint at the current optimizer step (the OOM fallback resumes from it)."""
        self._save_checkpoint(self.model, trial=None)

    def create_model_card(self, *args, **kwargs) -> None:
        """Model cards are written by ``qlora-med push``, not into every checkpoint."""
