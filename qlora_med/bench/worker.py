"""One ``qlora-med bench`` variant, run in a fresh process: ``python -m qlora_med.bench.worker PAYLOAD_JSON``.

Imports everything first, takes the RSS, builds the batches, trains ``warmup + steps`` optimizer steps
(hand-written baseline loop or the kit's ``StageTrainer``) and writes its measurements as JSON to
``payload["result"]``. Method: see :mod:`qlora_med.bench.suite`, which starts this worker per variant.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

from qlora_med.bench.suite import BenchSpec, Variant, make_batches
from qlora_med.config.schema import TinyModelConfig


def _rss_mib(key: str = "VmRSS") -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", status).group(1)) / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Meter:
    """Wall time and peak memory over the measured steps (called after each optimizer step)."""

    def __init__(self, warmup: int, rss0: float) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.warmup, self.rss0, self.t0, self.t1, self.persistent = warmup, rss0, None, None, None
        self.loads: list[float] = []  # 1-min load average at the start and end of the measured steps
        self.cpu0 = self.cpu1 = 0.0  # process CPU seconds (all threads): start / end of measured steps

    def step_done(self, step: int) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step == self.warmup:
            gc.collect()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                self.persistent = _rss_mib() - self.rss0
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
            self.t0 = time.perf_counter()
            self.loads = [os.getloadavg()[0]]
            self.cpu0 = _cpu_seconds()
        self.t1 = now
        self.cpu1 = _cpu_seconds()
        if step > self.warmup:
            self.loads[1:] = [os.getloadavg()[0]]

    def memory(self) -> tuple[float, float]:
        """(training memory, absolute peak) in MiB."""
        import torch

        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2**20
            return peak, peak
        peak = _rss_mib("VmHWM")
        return peak - self.rss0, peak


def _baseline(spec: BenchSpec, model_dir: Path, batches: list[dict], meter: _Meter) -> list[float]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    from qlora_med.config.schema import LoraConfig as KitLora
    from qlora_med.model.load import QUANT_SKIP_MODULES, lora_target_regex, resolve_compute_dtype

    dtype = resolve_compute_dtype("auto")
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=QUANT_SKIP_MODULES,
    )  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlavaForConditionalGeneration.from_pretrained(
        model_dir, quantization_config=quant, dtype=dtype, attn_implementation="sdpa", device_map={"": device}
    )
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    torch.manual_seed(spec.seed)
    lora = KitLora()
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora_target_regex(lora), task_type="CAUSAL_LM"))  # fmt: skip
    for name, param in model.named_parameters():
        if "multi_modal_projector" in name:
            param.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    losses = []
    for step, batch in enumerate(batches, start=1):
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        del loss
        meter.step_done(step)
    return losses


def _kit(
    spec: BenchSpec, variant: Variant, model_dir: Path, batches: list[dict], meter: _Meter, out: Path
) -> list[float]:
    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback, set_seed

    from qlora_med.config.schema import DataConfig, KernelsConfig, LoraConfig, ModelConfig, StageConfig
    from qlora_med.data.packing import pack_batch
    from qlora_med.model.load import load_model, resolve_compute_dtype
    from qlora_med.patches.select import apply_kernels
    from qlora_med.train.trainable import setup_trainable
    from qlora_med.train.trainer import StageTrainer, sft_config

    stage = StageConfig(
        name="bench", kind="instruct", data=DataConfig(path="-", image_folder="-"), max_steps=len(batches),
        per_device_batch_size=1, max_length=spec.max_length, save_steps=10**6, logging_steps=10**6,
        gradient_checkpointing=variant.gradient_checkpointing, padding_free=variant.padding_free, warmup_ratio=0.0,
    )  # fmt: skip
    kernels = KernelsConfig(liger=variant.liger, nf4_lora=variant.nf4_lora, loss=variant.loss)
    dtype = resolve_compute_dtype("auto")
    set_seed(spec.seed)
    model, processor = load_model(
        ModelConfig(name_or_path=str(model_dir), attn_implementation="sdpa"), model_dir, dtype
    )
    model = setup_trainable(model, stage.train, LoraConfig(), None, stage.gradient_checkpointing)
    setup = apply_kernels(model, kernels, stage.padding_free)

    def collate(features: list[dict]) -> dict:
        batch = batches[features[0]["index"]]
        return pack_batch(batch) if stage.padding_free else dict(batch)

    class InOrder(StageTrainer):
        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202 - same batches as the baseline
            return SequentialSampler(train_dataset or self.train_dataset)

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            meter.step_done(state.global_step)

    trainer = InOrder(
        model=model, args=sft_config(stage, out, spec.seed, dtype, "none"),
        train_dataset=datasets.Dataset.from_dict({"index": list(range(len(batches)))}), data_collator=collate,
        processing_class=processor, projector_lr=stage.projector_lr, save_total_limit=1, loss_mode=setup.loss,
        callbacks=[Timer()],
    )  # fmt: skip
    trainer.args.disable_tqdm = True
    trainer.args.logging_first_step = True
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def worker(payload: dict) -> dict:
    """Run one variant (in this process) and return its measurements."""
    import bitsandbytes  # noqa: F401 - everything imported before the memory baseline
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from transformers import AutoProcessor

    spec = BenchSpec(**{**payload["spec"], "model": TinyModelConfig(**payload["spec"]["model"])})
    variant = Variant(**payload["variant"])
    model_dir = Path(payload["model_dir"])
    processor = AutoProcessor.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    batches = make_batches(
        spec, processor.tokenizer, config["image_token_index"], processor.tokenizer.pad_token_id
    )
    gc.collect()
    meter = _Meter(spec.warmup, _rss_mib())
    if variant.kit:
        with tempfile.TemporaryDirectory() as out:
            losses = _kit(spec, variant, model_dir, batches, meter, Path(out))
    else:
        losses = _baseline(spec, model_dir, batches, meter)
    train_mem, peak = meter.memory()
    measured = batches[spec.warmup :]
    return {
        "variant": variant.name, "what": variant.what, "seconds": meter.t1 - meter.t0,
        "tokens": sum(int(b["attention_mask"].sum()) for b in measured),
        "padded_tokens": sum(b["input_ids"].numel() for b in measured), "train_mem_mib": train_mem,
        "peak_mib": peak, "loss_first": losses[0] if losses else float("nan"),
        "extra": {"persistent_mib": meter.persistent, "threads": torch.get_num_threads(), "steps": len(measured),
            "load": max(meter.loads, default=float("nan")), "cpu_seconds": meter.cpu1 - meter.cpu0},
    }  # fmt: skip


if __name__ == "__main__":  # worker entry point: python -m qlora_med.bench.worker PAYLOAD_JSON
    logging.basicConfig(level=logging.WARNING)
    _payload = json.loads(sys.argv[1])
    Path(_payload["result"]).write_text(json.dumps(worker(_payload)))
