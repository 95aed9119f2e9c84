"""Validate ``qlora_med.plan`` against published GPU numbers and measured CPU peaks.

    python benchmarks/validate_planner.py            # published table + CPU measurements (~4 min, 2 cores)
    python benchmarks/validate_planner.py --skip-cpu # published table only (seconds)
    python benchmarks/validate_planner.py --csv benchmarks/results/validate_planner.csv

CPU method: each model group runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=262144`` so glibc
serves every tensor >= 256 KiB by its own mmap and returns it on free: the resident set then follows
live tensor bytes (torch's CPU allocator has no cache). Per config: one warm-up step (creates AdamW
states, thread pools), ``gc.collect()``, RSS before the step (``/proc/self/status`` VmRSS), reset of
the high-water mark (``echo 5 > /proc/self/clear_refs``), one measured step (forward, backward,
AdamW step, ``zero_grad(set_to_none=True)``), VmHWM. measured step = VmHWM - VmRSS before: gradients
+ activations + logits/loss + transients, which is the planner's ``step_bytes`` on CPU (fp32
compute, no CUDA context). ``persistent`` = RSS after the warm-up minus RSS before loading: weights,
LoRA, optimizer states, plus the framework's own allocations (reported, not targeted).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qlora_med.plan.estimate import GIB, LLMShape, ModelShape, RunSpec, VisionShape, estimate_memory, preset

MB, MIB = 1e6, 2**20


@dataclass(frozen=True)
class Published:
    """A published measurement and the run that produced it, in the planner's terms."""

    name: str
    model: str
    run: RunSpec
    quantity: str  # weights | allocated_peak
    value_bytes: float
    shown: str
    source: str
    note: str


PUBLISHED = (
    Published(
        "QLoRA paper: LLaMA-7B 4-bit base model", "llama-7b",
        RunSpec(embed_dtype="fp32"), "weights", 5048 * MB, "5,048 MB",
        "arXiv:2305.14314 sec. 2 'Memory Requirement of Parameter-Efficient Finetuning'",
        "the frozen 4-bit model only (not LoRA/optimizer/activations); NF4+DQ linears, embeddings/lm_head/norms "
        "upcast to fp32 by prepare_model_for_kbit_training; how it was read (allocator vs nvidia-smi) is not stated"),
    *(Published(
        f"fsdp_qlora: Llama-2-7B, 2 GPUs FSDP, bs 1, ctx {ctx}", "llama-2-7b",
        RunSpec(micro_batch=1, seq_len=ctx, lora_rank=64, lora_targets=("q", "k", "v", "gate", "up", "down"),
                lora_dropout=0.1, trainable_dtype="bf16", autocast=False, ce="legacy", padded=False,
                n_gpus=2, sharding="fsdp"),
        "allocated_peak", gib * GIB, f"{gib} GiB",
        "AnswerDotAI/fsdp_qlora benchmarks_03_2024.md (dual 3090, train.py defaults r=64, bf16, reentrant ckpt)",
        "published = peak *reserved*, incl. ~3.7 GiB cached while loading; predicted = per-GPU allocated peak")
      for ctx, gib in ((512, 4.98), (2048, 5.21))),
    *(Published(
        f"fsdp_qlora: Llama-2-7B LoRA (bf16 base), 2 GPUs FSDP, bs 1, ctx {ctx}", "llama-2-7b",
        RunSpec(micro_batch=1, seq_len=ctx, lora_rank=64, lora_targets=("q", "k", "v", "gate", "up", "down"),
                lora_dropout=0.1, trainable_dtype="bf16", autocast=False, ce="legacy", padded=False,
                quantization="none", n_gpus=2, sharding="fsdp"),
        "allocated_peak", gib * GIB, f"{gib} GiB",
        "AnswerDotAI/fsdp_qlora benchmarks_03_2024.md (same runs, 16-bit LoRA)",
        "published = peak *allocated* (the note under the LoRA table): like with like, but not 4-bit")
      for ctx, gib in ((512, 8.28), (2048, 9.16))),
    Published(
        "torchtune: Llama-3.1-8B QLoRA, 1x 4090", "llama-3.1-8b",
        RunSpec(micro_batch=2, seq_len=2048, lora_rank=8, lora_dropout=0.0, trainable_dtype="bf16", autocast=False,
                ce="chunked", padded=False),
        "allocated_peak", 7.4 * GIB, "7.4 GiB",
        "pytorch/torchtune README; recipes/configs/llama3_1/8B_qlora_single_device.yaml",
        "bs 2, packed 2048, r=8 on q,k,v,o + MLP, activation ckpt, bf16, chunked CE (8), torch.compile"),
)


def published_rows() -> list[dict]:
    rows = []
    for p in PUBLISHED:
        est = estimate_memory(preset(p.model), p.run)
        if p.quantity == "weights":
            pred = sum(c.bytes for c in est.components if c.name.startswith(("LLM linear weights", "embeddings")))
        else:
            pred = est.allocated_peak_bytes
        unit = MB if p.shown.endswith("MB") else GIB
        rows.append({"case": p.name, "predicted": f"{pred / unit:,.2f}".rstrip("0").rstrip(".") + (" MB" if unit == MB else " GiB"),
                     "published": p.shown, "error_pct": 100 * (pred - p.value_bytes) / p.value_bytes,
                     "source": p.source, "note": p.note})
    return rows


# ---- CPU measurements ------------------------------------------------------------------------------
# groups share one loaded model; configs run smallest first; runs are (batch, seq, checkpointed decoder layers:
# 0, the first k, or "all")
CPU_MODELS = {
    "small": ModelShape("small", LLMShape(2, 256, 1024, 4, 2, 32000), VisionShape(2, 128, 512, 4, 224, 14)),
    "mid": preset("mid"),
    # small vocabulary: the backward phase (recomputed layer + working set + dequantized weight) is the peak
    "wide": ModelShape("wide", LLMShape(2, 1024, 4096, 8, 2, 2048), VisionShape(2, 128, 512, 4, 224, 14)),
}
CPU_GROUPS = (
    {"model": "small", "r": 16, "dropout": 0.0, "runs": [(1, 512, "all"), (2, 512, 0), (2, 1024, 0)]},
    {"model": "mid", "r": 16, "dropout": 0.0, "runs": [(1, 512, "all"), (1, 1024, 0), (1, 2048, 2), (1, 2048, "all")]},
    {"model": "mid", "r": 64, "dropout": 0.05, "runs": [(1, 512, 0), (1, 1024, 1), (1, 1024, 3), (1, 1024, "all")]},
    {"model": "wide", "r": 16, "dropout": 0.0, "runs": [(1, 512, "all"), (1, 512, 0), (1, 1024, 1), (1, 1024, "all")]},
)


def cpu_run(group: dict, b: int, s: int, ckpt: int | str) -> RunSpec:
    run = RunSpec(micro_batch=b, seq_len=s, lora_rank=group["r"], lora_dropout=group["dropout"], compute_dtype="fp32",
                  device="cpu", padded=False, autocast=False)
    layers = CPU_MODELS[group["model"]].llm.layers
    return run.with_checkpointed(layers if ckpt == "all" else ckpt, layers)


def _rss() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) * 1024 for k in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def worker(group: dict, cache: str) -> None:
    """Load the group's model once (quantized), then measure each config; prints one JSON line per config."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        BitsAndBytesConfig,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
    )

    shape = CPU_MODELS[group["model"]]
    llm, vis = shape.llm, shape.vision
    path = Path(cache) / group["model"]
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        vc = CLIPVisionConfig(hidden_size=vis.hidden, intermediate_size=vis.intermediate, num_hidden_layers=vis.layers,
                              num_attention_heads=vis.heads, image_size=vis.image_size, patch_size=vis.patch_size)
        tc = MistralConfig(hidden_size=llm.hidden, intermediate_size=llm.intermediate, num_hidden_layers=llm.layers,
                           num_attention_heads=llm.heads, num_key_value_heads=llm.kv_heads, vocab_size=llm.vocab,
                           max_position_embeddings=4096, head_dim=llm.hidden // llm.heads)
        cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=llm.vocab - 1, vision_feature_layer=-2,
                          vision_feature_select_strategy="default")
        LlavaForConditionalGeneration(cfg).save_pretrained(path)
    gc.collect()
    m0 = _rss()[0]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
    model = LlavaForConditionalGeneration.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
    model.config.use_cache = False
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    model = get_peft_model(model, LoraConfig(r=group["r"], lora_alpha=2 * group["r"], lora_dropout=group["dropout"],
                                             target_modules=targets))
    for name, p in model.named_parameters():
        if "multi_modal_projector" in name:
            p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    persistent = None
    decoder = model.get_base_model().model.language_model.layers
    for b, s, ckpt in group["runs"]:
        if ckpt:
            model.get_base_model().activation_checkpointing_enable()
            for i, layer in enumerate(decoder):  # the first k layers only
                layer.gradient_checkpointing = ckpt == "all" or i < ckpt
        else:
            model.get_base_model().activation_checkpointing_disable()
        ids = torch.randint(2, llm.vocab - 100, (b, s), generator=gen)
        ids[:, 1:1 + shape.image_tokens] = llm.vocab - 1
        labels = ids.clone()
        labels[:, :1 + shape.image_tokens] = -100
        pix = torch.randn(b, 3, vis.image_size, vis.image_size, generator=gen)

        def step(ids: torch.Tensor = ids, pix: torch.Tensor = pix, labels: torch.Tensor = labels) -> None:
            loss = model(input_ids=ids, pixel_values=pix, labels=labels).loss  # outputs dropped, as in Trainer
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        gc.collect()
        before = _rss()[0]
        if persistent is None:
            persistent = before - m0
        Path("/proc/self/clear_refs").write_text("5")
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        peak = _rss()[1]
        print(json.dumps({"b": b, "s": s, "ckpt": ckpt, "step": peak - before, "persistent": persistent, "dt": dt}), flush=True)


def cpu_rows(cache: str) -> list[dict]:
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="262144", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    for group in CPU_GROUPS:
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(group), "--cache", cache], env=env,
                             capture_output=True, text=True, check=False)
        results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not results:
            raise RuntimeError(f"worker failed for {group}:\n{out.stderr[-3000:]}")
        for res in results:
            run = cpu_run(group, res["b"], res["s"], res["ckpt"])
            est = estimate_memory(CPU_MODELS[group["model"]], run)
            pred = est.step_bytes
            rows.append({"case": f"{group['model']} r{group['r']} drop{group['dropout']} b{res['b']} s{res['s']} "
                                 f"ckpt{res['ckpt']}",
                         "predicted": f"{pred / MIB:.0f} MiB", "measured": f"{res['step'] / MIB:.0f} MiB",
                         "error_pct": 100 * (pred - res["step"]) / res["step"], "peak_phase": est.peak_phase,
                         "persistent_pred": f"{est.total('static') / MIB:.0f} MiB",
                         "persistent_meas": f"{res['persistent'] / MIB:.0f} MiB", "step_s": f"{res['dt']:.1f}"})
    return rows


def print_table(rows: list[dict], cols: list[str]) -> None:
    cells = [[c] + [f"{r[c]:+.1f}" if isinstance(r[c], float) else str(r[c]) for r in rows] for c in cols]
    widths = [max(len(x) for x in col) for col in cells]
    for i in range(len(rows) + 1):
        print("  ".join(col[i].ljust(w) for col, w in zip(cells, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-cpu", action="store_true", help="only the published comparisons")
    ap.add_argument("--csv", type=Path, help="append one row per case (with hardware, versions, date)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker), args.cache)
        return 0
    t0 = time.time()
    pub = published_rows()
    print("Published GPU measurements (error = predicted vs published)\n")
    print_table(pub, ["case", "predicted", "published", "error_pct"])
    for r in pub:
        print(f"  - {r['case']}: {r['note']}. Source: {r['source']}")
    rows = []
    if not args.skip_cpu:
        with tempfile.TemporaryDirectory() as cache:
            rows = cpu_rows(cache)
        print("\nCPU, measured step peak (VmHWM - VmRSS before the step) vs planner step_bytes (fp32, no context)\n")
        print_table(rows, ["case", "predicted", "measured", "error_pct", "peak_phase", "persistent_pred",
                           "persistent_meas", "step_s"])
        errs = [abs(r["error_pct"]) for r in rows]
        print(f"\nmax |error| {max(errs):.1f}%, mean |error| {sum(errs) / len(errs):.1f}% over {len(rows)} configs")
    print(f"\ntook {time.time() - t0:.0f} s")
    if args.csv:
        import torch
        import transformers

        args.csv.parent.mkdir(parents=True, exist_ok=True)
        new = not args.csv.exists()
        with args.csv.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["date", "host", "torch", "transformers", "kind", "case", "predicted", "reference", "error_pct"])
            meta = [datetime.date.today().isoformat(), platform.processor() or platform.machine(), torch.__version__,
                    transformers.__version__]
            for r in pub:
                w.writerow(meta + ["published", r["case"], r["predicted"], r["published"], f"{r['error_pct']:.1f}"])
            for r in rows:
                w.writerow(meta + ["cpu", r["case"], r["predicted"], r["measured"], f"{r['error_pct']:.1f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
