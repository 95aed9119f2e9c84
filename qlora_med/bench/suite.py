"""``qlora-med bench``: the kit against a hand-written QLoRA loop and TRL's documented VLM recipe, on curriculum-like data.

Model: a LLaVA built from config (:data:`MID`: CLIP 4 x 256 @ 224 px -> 256 image tokens, Mistral 4 x 512, the real
Mistral-v0.2 tokenizer), random weights; LLM in NF4 + double quant, LoRA r16 / alpha 32 / dropout 0.05, compute
dtype ``auto`` (bf16 on GPUs and on CPUs with native bf16, else fp32).

Workloads (:mod:`qlora_med.bench.workloads`): ``align`` (one PMC-style caption per image) and ``instruct`` (1-5 round
conversations, text median ~360 tokens, p90 ~830, plus the image tokens), real images, written once as LLaVA-Med
records; each variant reads, templates, masks and collates them its own way.

Variants (:data:`VARIANTS`), each run in its own subprocess, repeated and interleaved (round 1: A B C ..., round 2:
A B C ..., for each mix), so slow drift and other processes on the machine hit every variant alike:

* ``baseline`` (:mod:`~qlora_med.bench.baseline`): hand-written transformers + peft + bitsandbytes loop that imports
  nothing from the kit;
* ``trl`` (:mod:`~qlora_med.bench.trl_reference`): ``SFTTrainer`` + ``peft_config`` as TRL's VLM docs show it (it
  quantizes and LoRAs the vision tower and projector too, and puts loss on every token: the table says so);
* ``kit`` (the defaults as ``qlora-med run`` resolves them: ``padding_free: auto`` and ``gradient_checkpointing:
  auto``), ``kit_padded`` (``padding_free: false``), ``kit_ckpt`` (``gradient_checkpointing: true``, as the
  baseline) (:mod:`~.worker`), and opt-in ablations.

The matmul peak is measured before the first and after the last run (the better of the two counts). Reported per mix
and variant: the median and min-max over rounds of real (non-pad) tokens per second of wall time
over the measured steps, the absolute peak RSS of the worker and its training-attributable part (peak minus the
RSS after imports), model-FLOP utilisation against this machine's measured matmul peak (:mod:`~.flops`), the
first-step loss, and what each trains. Output: a markdown table, JSON, a plot and a CSV row per result
(:mod:`~.report`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
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

BENCH_DIR = Path(__file__).resolve().parent
MID = TinyModelConfig(
    image_size=224, patch_size=14, vision_hidden=256, vision_layers=4, vision_heads=4, text_hidden=512,
    text_intermediate=2048, text_layers=4, text_heads=8, text_kv_heads=4, lm_head_std=0.02,
)  # fmt: skip
QUICK = TinyModelConfig(
    image_size=112, patch_size=14, vision_hidden=64, vision_layers=2, vision_heads=2, text_hidden=128,
    text_intermediate=256, text_layers=2, text_heads=4, text_kv_heads=2, lm_head_std=0.02,
)  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One measured configuration: which worker runs it and, for the kit, which switches change."""

    name: str
    what: str
    runner: str = "kit"  # kit | baseline | trl
    padding_free: bool | str = "auto"  # the stage settings, as in a recipe
    gradient_checkpointing: bool | str = "auto"
    checkpoint_share: float = 1.0  # with gradient_checkpointing true: the leading share of decoder layers
    liger: str = "auto"
    nf4_lora: str = "auto"
    loss: str = "auto"
    default: bool = True

    @property
    def script(self) -> Path:
        return BENCH_DIR / {"kit": "worker.py", "baseline": "baseline.py", "trl": "trl_reference.py"}[self.runner]


VARIANTS = (
    Variant("baseline", "hand-written transformers+peft+bnb loop", runner="baseline", gradient_checkpointing=True),
    Variant("trl", "TRL SFTTrainer + peft_config, as documented", runner="trl", gradient_checkpointing=True),
    Variant("kit", "kit defaults (padding_free: auto, gradient_checkpointing: auto)"),
    Variant("kit_padded", "kit, padding_free: false", padding_free=False),
    Variant("kit_ckpt", "kit, gradient_checkpointing: true", gradient_checkpointing=True),
    Variant("kit_full_logits", "kit, kernels.loss: full", loss="full", default=False),
    Variant("kit_trl_loss", "kit, kernels.loss: trl", loss="trl", default=False),
    Variant("kit_peft_nf4", "kit, kernels.nf4_lora: off (PEFT Linear4bit)", nf4_lora="off", default=False),
    Variant("baseline_no_ckpt", "baseline without gradient checkpointing", runner="baseline",
            gradient_checkpointing=False, default=False),
    Variant("kit_ckpt_half", "kit, gradient checkpointing on the first half of the decoder layers",
            gradient_checkpointing=True, checkpoint_share=0.5, default=False),
    Variant("kit_padded_ckpt", "kit, padding_free: false, gradient_checkpointing: true (the old defaults)",
            padding_free=False, gradient_checkpointing=True, default=False),
)  # fmt: skip


@dataclass(frozen=True)
class BenchSpec:
    """What to train, on what, for how long, how often."""

    model: TinyModelConfig = field(default_factory=lambda: dataclasses.replace(MID))
    model_name: str = "mid"
    batch_size: int = 4
    max_length: int = 2048
    steps: int = 3
    warmup: int = 1
    rounds: int = 3
    mixes: tuple[str, ...] = ("align", "instruct")
    seed: int = 0
    lora: dict[str, float] = field(default_factory=lambda: {"r": 16, "alpha": 32, "dropout": 0.05})
    cache_dir: str = ".cache/qlora-med"

    @property
    def image_tokens(self) -> int:
        return (self.model.image_size // self.model.patch_size) ** 2

    @property
    def samples(self) -> int:
        return self.batch_size * (self.warmup + self.steps)


@dataclass
class Run:
    """One worker's measurements (``data`` as the worker returned it)."""

    round: int
    mix: str
    variant: str
    data: dict[str, Any]

    @property
    def measured(self) -> list[dict]:
        return self.data["batches"][-self.data_steps :]

    @property
    def data_steps(self) -> int:
        return len(self.data["step_seconds"]) or 1

    @property
    def tokens(self) -> int:
        return sum(sum(b["lengths"]) for b in self.measured)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.data["seconds"]


@dataclass
class BenchResult:
    spec: BenchSpec
    variants: list[Variant]
    runs: list[Run]
    peaks: dict[str, dict]
    compute_dtype: str
    workload: dict[str, Any]
    hardware: str
    versions: dict[str, str]
    model_dir: str
    wall_s: float = 0.0


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


def bench_model_dir(spec: BenchSpec) -> Path:
    """Build the benchmark model once under ``cache_dir``."""
    from qlora_med.model.tiny import build_tiny

    path = Path(spec.cache_dir) / f"bench-{spec.model_name}"
    if not (path / "config.json").is_file():
        build_tiny(spec.model, path)
    return path.resolve()


def worker_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")  # fmt: skip
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_worker(script: Path, payload: dict, threads: int | None, cwd: Path) -> dict:
    """Run one worker script in a fresh process (its own memory high-water mark), from ``cwd`` (not the repository:
    its ``kernels/`` folder would shadow the ``kernels`` package bitsandbytes looks for)."""
    result = cwd / f"result-{os.getpid()}-{time.monotonic_ns()}.json"
    path = result.with_suffix(".payload.json")
    path.write_text(json.dumps({**payload, "result": str(result)}))
    proc = subprocess.run([sys.executable, str(script), str(path)], env=worker_env(threads), cwd=cwd,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode or not result.is_file():
        raise RuntimeError(f"bench worker {script.name} failed ({payload.get('mix')}):\n{proc.stderr[-4000:]}")
    data = json.loads(result.read_text())
    if data.get("kit_modules"):
        raise RuntimeError(f"{script.name} loaded kit modules {data['kit_modules']}: it must share no code with the kit")
    return data


def run_in_process(script: Path, payload: dict, threads: int | None, cwd: Path) -> dict:
    """A worker's ``run(payload)`` in this process (tests and ``--tiny`` checks: logic only, the memory high-water
    mark and imports are this process's). The baseline and TRL scripts import ``meter`` as a top-level module."""
    import importlib.util

    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"_bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run({**payload, "result": str(cwd / "unused.json")})


def matmul_peaks(dtypes: list[str], threads: int | None, cwd: Path, seconds: float = 1.5,
                 size: int | None = None) -> dict[str, dict]:
    """This machine's dense matmul peak per dtype, measured in a worker-like subprocess (same threads)."""
    extra = ["--seconds", str(seconds)] + (["--size", str(size)] if size else [])
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "meter.py"), "--peak", *dict.fromkeys(dtypes), *extra],
                          env=worker_env(threads), cwd=cwd, capture_output=True, text=True, check=True)  # fmt: skip
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["dtype"]: r for r in rows}


def payload_for(spec: BenchSpec, variant: Variant, mix: str, model_dir: Path, paths: dict, dtype: str) -> dict:
    return {
        "model_dir": str(model_dir), "records": str(paths[mix]), "images": str(paths["images"]), "mix": mix,
        "batch_size": spec.batch_size, "steps": spec.steps, "warmup": spec.warmup, "max_length": spec.max_length,
        "dtype": dtype, "seed": spec.seed, "gradient_checkpointing": variant.gradient_checkpointing,
        "lora": spec.lora, "variant": dataclasses.asdict(variant),
    }  # fmt: skip


def schedule(spec: BenchSpec, variants: list[Variant]) -> list[tuple[int, str, Variant]]:
    """The interleaved order: every round runs every mix's variants once, in the same order."""
    return [(r, mix, v) for r in range(1, spec.rounds + 1) for mix in spec.mixes for v in variants]


def describe_workload(spec: BenchSpec, paths: dict, processor) -> dict:
    from qlora_med.bench.worker import TEMPLATES as templates
    from qlora_med.bench.workloads import CAPTION, CONVERSATION, image_sizes, length_stats

    stats = {mix: length_stats(json.loads(paths[mix].read_text()), processor, templates[mix], spec.image_tokens,
                               spec.max_length) for mix in spec.mixes}  # fmt: skip
    model = {"align": CAPTION, "instruct": CONVERSATION}
    for mix in spec.mixes:
        m = model[mix]
        stats[mix]["generator"] = {"median": m.median, "sigma": m.sigma, "p90": round(m.percentile(0.9)),
                                   "clip": [m.low, m.high]}  # fmt: skip
    stats["images"] = [{"name": n, "width": w, "height": h} for n, w, h in image_sizes(paths["images"])]
    return stats


def run_bench(spec: BenchSpec, variants: list[Variant], threads: int | None = None, runner=run_worker) -> BenchResult:
    """Build model and workload, measure the matmul peak, then every (round, mix, variant) in interleaved order."""
    from transformers import AutoProcessor

    from qlora_med.bench.workloads import write_workload
    from qlora_med.model.load import resolve_compute_dtype

    start = time.time()
    model_dir = bench_model_dir(spec)
    processor = AutoProcessor.from_pretrained(model_dir)
    dtype = str(resolve_compute_dtype("auto")).removeprefix("torch.")
    runs = []
    with tempfile.TemporaryDirectory(prefix="qlora-med-bench-") as tmp:
        work = Path(tmp)
        paths = write_workload(work / "workload", processor.tokenizer, spec.samples, spec.seed)
        workload = describe_workload(spec, paths, processor)
        def measure_peaks() -> dict[str, dict]:
            if runner is run_worker:
                return matmul_peaks(["float32", dtype], threads, work)
            from qlora_med.bench.meter import matmul_peak  # in-process (tests): small and short

            return {d: matmul_peak(d, size=256, seconds=0.05) for d in dict.fromkeys(["float32", dtype])}

        peaks = measure_peaks()
        order = schedule(spec, variants)
        for i, (rnd, mix, variant) in enumerate(order, start=1):
            t = time.time()
            data = runner(variant.script, payload_for(spec, variant, mix, model_dir, paths, dtype), threads, work)
            runs.append(Run(rnd, mix, variant.name, data))
            logger.info("[%d/%d] round %d %s %s: %.0f tokens/s, peak RSS %.0f MiB (%.0f s)", i, len(order), rnd, mix,
                        variant.name, runs[-1].tokens_per_s, data["peak_rss_mib"], time.time() - t)  # fmt: skip
        for name, again in measure_peaks().items():  # measured at the start and the end: the best of both counts
            again["flops_start"] = peaks[name]["flops"]
            peaks[name] = again if again["flops"] >= peaks[name]["flops"] else {**peaks[name], "flops_end": again["flops"]}
    return BenchResult(spec, list(variants), runs, peaks, dtype, workload, hardware(), versions(), str(model_dir),
                       time.time() - start)
