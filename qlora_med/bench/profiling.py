"""``qlora-med bench --profile``: where a kit training step's time goes, from ``torch.profiler`` on CPU.

The kit variant (default ``kit``) is built exactly as the bench's worker builds it (:func:`~.worker.build_trainer`),
on the bench model and the first mix's workload; one warm-up step, then ``steps`` profiled steps. For the shares,
the profiled run labels four parts with ``record_function`` ranges by wrapping, for this process only:

* ``nf4_dequant``: bitsandbytes' ``dequantize_4bit`` (forward, and the fused layer's re-dequantize in backward);
* ``lora_layers``: the fused NF4+LoRA autograd function's forward and backward (dequant included), or PEFT's
  ``Linear4bit.forward`` when ``nf4_lora`` is off (its backward is then not labelled);
* ``loss``: the chunked linear cross-entropy's forward and backward (``kernels.loss: chunked``);
* ``optimizer``: torch's own ``Optimizer.step`` range.

Each share is that range's CPU time over the profiled wall time (ops run on the main thread; their intra-op
threads are inside the op). The top ops are ``key_averages()`` by self CPU time.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from pathlib import Path

LABELS = ("nf4_dequant", "lora_layers", "loss", "optimizer")


def _labelled(fn, label: str):
    import torch

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(f"bench::{label}"):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def labelled_ranges():
    """Wrap the kit's and bitsandbytes' functions in ``bench::<label>`` ranges; undone on exit."""
    import bitsandbytes.functional as bnbf
    from peft.tuners.lora import bnb as peft_bnb

    from qlora_med.kernels import linear_ce, nf4_lora

    patched = []

    def patch(owner, name: str, label: str, static: bool = False) -> None:
        original = owner.__dict__[name] if static else getattr(owner, name)
        fn = original.__func__ if isinstance(original, staticmethod) else original
        wrapped = _labelled(fn, label)
        setattr(owner, name, staticmethod(wrapped) if static else wrapped)
        patched.append((owner, name, original))

    patch(nf4_lora, "dequantize_4bit", "nf4_dequant")
    patch(bnbf, "dequantize_4bit", "nf4_dequant")
    for name in ("forward", "backward"):
        patch(nf4_lora.NF4LoRAFunction, name, "lora_layers", static=True)
        patch(linear_ce.ChunkedLinearCEFunction, name, "loss", static=True)
    patch(peft_bnb.Linear4bit, "forward", "lora_layers")
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def profile_kit(spec, steps: int = 3, threads: int | None = None, variant: str = "kit") -> dict:
    """Profile ``steps`` CPU training steps of a kit variant; returns top ops, shares and the step time."""
    import dataclasses

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoProcessor, TrainerCallback

    from qlora_med.bench.suite import VARIANTS, bench_model_dir, payload_for
    from qlora_med.bench.worker import build_trainer
    from qlora_med.bench.workloads import write_workload
    from qlora_med.model.load import resolve_compute_dtype

    if threads:
        torch.set_num_threads(threads)
    spec = dataclasses.replace(spec, steps=steps, warmup=1)
    chosen = next(v for v in VARIANTS if v.name == variant)
    model_dir = bench_model_dir(spec)
    processor = AutoProcessor.from_pretrained(model_dir)
    dtype = str(resolve_compute_dtype("auto")).removeprefix("torch.")
    prof = profile(activities=[ProfilerActivity.CPU])
    times: dict[str, float] = {}

    class Window(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if state.global_step == 1:
                times["t0"] = time.perf_counter()
                prof.start()
            elif state.global_step == 1 + steps:
                prof.stop()
                times["t1"] = time.perf_counter()

    mix = spec.mixes[-1]  # instruct when both
    with tempfile.TemporaryDirectory() as tmp, labelled_ranges():
        paths = write_workload(Path(tmp) / "workload", processor.tokenizer, spec.samples, spec.seed)
        payload = payload_for(spec, chosen, mix, model_dir, paths, dtype)
        trainer, recorder, setup, _ = build_trainer(payload, [Window()], Path(tmp))
        trainer.train()
    wall = times["t1"] - times["t0"]
    events = prof.key_averages()
    shares = {}
    for label in LABELS:
        name = "Optimizer.step#AdamW.step" if label == "optimizer" else f"bench::{label}"
        shares[label] = sum(e.cpu_time_total for e in events if e.key == name) / 1e6 / wall
    total_self = sum(e.self_cpu_time_total for e in events) / 1e6
    top = sorted((e for e in events if not e.key.startswith("bench::")), key=lambda e: e.self_cpu_time_total,
                 reverse=True)[:15]  # fmt: skip
    tokens = sum(sum(b["lengths"]) for b in recorder.batches[1:])
    return {
        "variant": variant, "mix": mix, "model": spec.model_name, "batch": spec.batch_size, "steps": steps,
        "compute_dtype": dtype, "kernels": setup.summary(), "wall_s": wall, "tokens": tokens,
        "threads": torch.get_num_threads(), "shares": shares, "profiled_self_s": total_self,
        "top_ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / 1e6 / wall,
                     "calls": e.count} for e in top],
    }  # fmt: skip


def format_profile(p: dict) -> str:
    lines = [
        f"qlora-med bench --profile: {p['variant']} on the {p['mix']} mix, {p['model']} model, batch {p['batch']}, "
        f"{p['steps']} profiled steps after 1 warm-up, compute {p['compute_dtype']}, {p['threads']} threads; kernels "
        f"{p['kernels']}",
        f"{p['wall_s']:.1f} s wall, {p['tokens']:,} real tokens ({p['tokens'] / p['wall_s']:,.0f} tokens/s under the "
        "profiler)", "", "share of wall time (a range includes what it calls; NF4 dequant is inside the LoRA layers):",
    ]  # fmt: skip
    names = {"nf4_dequant": "NF4 dequantize", "lora_layers": "NF4+LoRA layers (fwd+bwd)", "loss": "loss (fwd+bwd)",
             "optimizer": "optimizer step"}  # fmt: skip
    lines += [f"  {names[k]:28s} {v:6.1%}" for k, v in p["shares"].items()]
    lines += ["", f"  {'top ops by self CPU time':60s} {'self s':>8s} {'share':>7s} {'calls':>7s}"]
    lines += [f"  {t['op'][:60]:60s} {t['self_s']:8.2f} {t['share']:7.1%} {t['calls']:7d}" for t in p["top_ops"]]
    return "\n".join(lines)
