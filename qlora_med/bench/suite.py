"""``qlora-med bench``: real-token throughput and peak training memory, hand-written QLoRA loop vs the kit.

Model: a LLaVA built from config (:data:`MID`: CLIP 4 layers x 256 @ 224 px -> 256 image tokens, Mistral
4 layers x 512, the real Mistral-v0.2 tokenizer: vocab 32,000 + image and pad tokens, padded to 32,064), LLM
in NF4 + double quant with LoRA r16 on its 7 linear layers, projector trained in fp32, vision tower frozen,
compute dtype from ``compute_dtype: auto`` (fp32 on CPUs without native bf16). Same model, LoRA placement,
batches and optimizer steps for every variant; only the implementation differs.

Data: micro-batches of ``batch_size`` samples, each BOS + image tokens + text made of real Mistral token ids
(``data/sample`` texts), lengths long-tailed: half captions (log-normal, median 90 tokens, the caption is
labelled), half conversations (1-5 rounds: question median 20 tokens, answer median 80 and labelled), cut at
``max_length``. The first measured batch holds one ``max_length`` sample, so the peak is taken at that length.

Variants, each in a fresh subprocess: ``baseline`` is what a user writes with transformers + peft +
bitsandbytes: ``prepare_model_for_kbit_training`` (its default gradient checkpointing), ``get_peft_model``,
``model(**batch).loss`` on padded batches with full logits, ``loss.backward()``, ``torch.optim.AdamW``.
``kit`` is ``StageTrainer`` exactly as ``qlora-med run`` builds it, with the kernel defaults and
``padding_free: true``; each ablation turns one of its features off.

Measured after ``warmup`` steps, over ``steps`` steps: tokens/s counts real (non-pad) tokens, image tokens
included. Memory on CPU: ``VmHWM`` of the worker (high-water mark reset after warm-up) minus its RSS after
imports and before the model loads, i.e. weights + adapters + optimizer + the step's peak; on CUDA:
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_med.config.schema import TinyModelConfig

logger = logging.getLogger(__name__)

MID = TinyModelConfig(
    image_size=224, patch_size=14, vision_hidden=256, vision_layers=4, vision_heads=4, text_hidden=512,
    text_intermediate=2048, text_layers=4, text_heads=8, text_kv_heads=4, lm_head_std=0.02,
)  # fmt: skip
QUICK = TinyModelConfig(
    image_size=112, patch_size=14, vision_hidden=64, vision_layers=2, vision_heads=2, text_hidden=128,
    text_intermediate=256, text_layers=2, text_heads=4, text_kv_heads=2, lm_head_std=0.02,
)  # fmt: skip
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"  # the repository's data/sample


@dataclass(frozen=True)
class Variant:
    """One measured configuration: the baseline loop, or the kit with some features changed."""

    name: str
    what: str
    kit: bool = True
    loss: str = "auto"
    nf4_lora: str = "auto"
    liger: str = "auto"
    padding_free: bool = True
    gradient_checkpointing: bool = True
    gpu_only: bool = False


VARIANTS = (
    Variant("baseline", "hand-written loop: peft + bnb, full logits, padded", kit=False),
    Variant("kit", "StageTrainer, kernels auto, padding_free"),
    Variant("no_chunked_ce", "kit, loss=trl (TRL fused LM head)", loss="trl"),
    Variant("full_logits", "kit, loss=full", loss="full"),
    Variant("no_padding_free", "kit, padded batches", padding_free=False),
    Variant("no_fused_nf4", "kit, PEFT Linear4bit forward", nf4_lora="off"),
    Variant("no_grad_ckpt", "kit, gradient_checkpointing=false", gradient_checkpointing=False),
    Variant("no_liger", "kit, liger=off", liger="off", gpu_only=True),
)


@dataclass(frozen=True)
class BenchSpec:
    """What to train and for how long."""

    model: TinyModelConfig = field(default_factory=lambda: dataclasses.replace(MID))
    model_name: str = "mid"
    batch_size: int = 4
    max_length: int = 1024
    steps: int = 5
    warmup: int = 1
    seed: int = 0
    cache_dir: str = ".cache/qlora-med"

    @property
    def image_tokens(self) -> int:
        return (self.model.image_size // self.model.patch_size) ** 2


@dataclass
class Result:
    variant: str
    what: str
    tokens: int
    seconds: float
    train_mem_mib: float
    peak_mib: float
    loss_first: float
    padded_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        """Tokens per CPU-second of this process (all threads): robust to other processes on the machine."""
        return self.tokens / max(self.extra.get("cpu_seconds", 0.0), 1e-9)


# ----------------------------------------------------------------------------- data


def _token_pool(tokenizer) -> list[int]:
    texts = []
    for path in sorted(SAMPLE_DIR.glob("*.json")):
        for record in json.loads(path.read_text()):
            texts += [turn["value"].replace("<image>", "") for turn in record.get("conversations", [])]
    ids = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"] if texts else []
    return ids if len(ids) > 1000 else list(range(1000, 30000))


def _lognormal(rng: random.Random, median: float, sigma: float) -> int:
    return max(4, int(rng.lognormvariate(math.log(median), sigma)))


def sample_segments(rng: random.Random) -> list[tuple[int, bool]]:
    """(length, labelled) text segments of one sample: a caption, or a 1-5 round conversation."""
    if rng.random() < 0.5:
        return [(_lognormal(rng, 90, 0.9), True)]
    rounds = rng.choices([1, 2, 3, 4, 5], weights=[35, 25, 20, 12, 8])[0]
    return [
        seg
        for _ in range(rounds)
        for seg in ((_lognormal(rng, 20, 0.6), False), (_lognormal(rng, 80, 0.8), True))
    ]


def make_batches(spec: BenchSpec, tokenizer, image_token_id: int, pad_id: int) -> list[dict]:
    """``warmup + steps`` padded batches (input_ids, attention_mask, labels, pixel_values), deterministic."""
    import torch

    from qlora_med.data.collate import pad_right

    rng = random.Random(spec.seed)
    pool = _token_pool(tokenizer)
    gen = torch.Generator().manual_seed(spec.seed)
    size = spec.model.image_size
    batches = []
    for b in range(spec.warmup + spec.steps):
        samples = []
        for i in range(spec.batch_size):
            ids = [tokenizer.bos_token_id] + [image_token_id] * spec.image_tokens
            labels = [-100] * len(ids)
            segments = sample_segments(rng)
            if b == spec.warmup and i == 0:  # one full-length sample in the first measured batch
                segments.append((spec.max_length, True))
            for length, labelled in segments:
                start = rng.randrange(len(pool) - length) if len(pool) > length else 0
                chunk = (pool * (1 + length // len(pool)))[start : start + length]
                ids += chunk
                labels += chunk if labelled else [-100] * len(chunk)
            samples.append((ids[: spec.max_length], labels[: spec.max_length]))
        input_ids, labels, mask = pad_right([i for i, _ in samples], [lab for _, lab in samples], pad_id)
        batch = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "pixel_values": torch.randn(len(samples), 3, size, size, generator=gen),
        }
        batches.append(batch)
    return batches


# ----------------------------------------------------------------------------- driver


def bench_model_dir(spec: BenchSpec) -> Path:
    """Build the benchmark model once under ``cache_dir``."""
    from qlora_med.model.build import build_tiny

    path = Path(spec.cache_dir) / f"bench-{spec.model_name}"
    if not (path / "config.json").is_file():
        build_tiny(spec.model, path)
    return path.resolve()


def run_variant(spec: BenchSpec, variant: Variant, model_dir: Path, threads: int | None) -> Result:
    """One variant in a fresh Python process (clean memory high-water mark)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        payload = {"spec": dataclasses.asdict(spec), "variant": dataclasses.asdict(variant),
                   "model_dir": str(model_dir), "result": str(result)}  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "qlora_med.bench.worker", json.dumps(payload)], env=env,
                              capture_output=True, text=True, check=False)  # fmt: skip
        if proc.returncode or not result.is_file():
            raise RuntimeError(f"bench variant {variant.name} failed:\n{proc.stderr[-4000:]}")
        return Result(**json.loads(result.read_text()))


def run_bench(spec: BenchSpec, variants: list[Variant], threads: int | None = None) -> list[Result]:
    import torch

    model_dir = bench_model_dir(spec)
    results = []
    for variant in variants:
        if variant.gpu_only and not torch.cuda.is_available():
            logger.info(
                "skipping %s: %s is a no-op without CUDA (auto resolves to off)", variant.name, variant.what
            )
            continue
        start = time.time()
        results.append(run_variant(spec, variant, model_dir, threads))
        r = results[-1]
        logger.info("%s: %.0f tokens/s, %.0f MiB (%.0f s)", r.variant, r.tokens_per_s, r.train_mem_mib,
                    time.time() - start)  # fmt: skip
    return results


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        names = []
    return f"{names[0].strip() if names else platform.machine()} x{os.cpu_count()} cores"


def versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import torch
    import transformers
    import trl

    return {m.__name__: m.__version__ for m in (torch, transformers, peft, bitsandbytes, trl)}


def table(results: list[Result]) -> list[dict[str, str]]:
    """Rows for printing / CSV, ratios against ``baseline`` (and ``kit`` for the ablations)."""
    by = {r.variant: r for r in results}
    base, kit = by.get("baseline"), by.get("kit")

    def ratio(a: float, ref: Result | None, attr: str) -> str:
        return f"{a / getattr(ref, attr):.2f}" if ref is not None else ""

    rows = []
    for r in results:
        ablation = kit if r.variant not in ("baseline", "kit") else None
        threads = r.extra.get("threads", 1)
        rows.append({
            "variant": r.variant, "what": r.what, "tok/s": f"{r.tokens_per_s:.0f}",
            "x base": ratio(r.tokens_per_s, base, "tokens_per_s"),
            "tok/CPU-s": f"{r.tokens_per_cpu_s:.0f}", "x base CPU": ratio(r.tokens_per_cpu_s, base, "tokens_per_cpu_s"),
            "train MiB": f"{r.train_mem_mib:.0f}", "x base mem": ratio(r.train_mem_mib, base, "train_mem_mib"),
            "vs kit CPU": ratio(r.tokens_per_cpu_s, ablation, "tokens_per_cpu_s"),
            "vs kit mem": ratio(r.train_mem_mib, ablation, "train_mem_mib"),
            "peak MiB": f"{r.peak_mib:.0f}", "s/step": f"{r.seconds / r.extra.get('steps', 1):.1f}",
            "CPU use": f"{r.extra.get('cpu_seconds', 0.0) / (r.seconds * threads):.0%}",
            "load": f"{r.extra.get('load', float('nan')):.1f}", "loss@1": f"{r.loss_first:.4f}",
        })  # fmt: skip
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no results)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def append_csv(path: Path, spec: BenchSpec, results: list[Result], rows: list[dict[str, str]]) -> None:
    """Append one row per variant with date, hardware, threads and versions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "hardware": hardware(),
            **versions(), "model": spec.model_name, "batch": spec.batch_size, "max_length": spec.max_length,
            "steps": spec.steps}  # fmt: skip
    with path.open("a", newline="") as f:
        writer = None
        for result, row in zip(results, rows, strict=True):
            record = {**meta, "threads": result.extra.get("threads"), **row, "tokens": result.tokens,
                      "padded_tokens": result.padded_tokens, "seconds": f"{result.seconds:.2f}"}  # fmt: skip
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(record))
                if new:
                    writer.writeheader()
            writer.writerow(record)
