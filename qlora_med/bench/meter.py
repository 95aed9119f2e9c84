"""The bench's measuring stick, shared by every variant's worker: the kit's, the hand-written baseline's and TRL's.

Standalone on purpose: it imports the standard library and torch only, never ``qlora_med``, so the baseline and
TRL workers (run as scripts, ``python qlora_med/bench/baseline.py PAYLOAD``) load it as the top-level module
``meter`` without importing any kit code. What it measures:

* **RSS** (``/proc/self/status``): ``rss_after_imports`` is taken once every library the worker needs is imported
  and before the model loads; ``VmHWM`` at the end of the worker is the **absolute peak** of the whole process
  (imports, model loading, data, training); the **training-attributable** memory is that peak minus the RSS after
  imports. On CUDA: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the whole worker.
* **Time**: :class:`StepMeter` is called after each optimizer step (the GPU synchronised first); the measured
  window runs from the end of the last warm-up step to the end of the last step, so it covers data loading,
  collation, forward, backward and optimizer of exactly the measured steps. Process CPU seconds over the same
  window and the 1-minute load average say whether other processes competed.
* **Matmul peak**: :func:`matmul_peak` times a large ``torch.matmul`` loop (``python meter.py --peak``), the
  denominator of the model-FLOP utilisation.
"""

from __future__ import annotations

import json
import os
import re
import resource
import time
from pathlib import Path


def rss_mib(key: str = "VmRSS") -> float:
    """This process's resident set (``VmRSS``) or its high-water mark (``VmHWM``), MiB; ru_maxrss off Linux."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return int(re.search(rf"{key}:\s+(\d+)", status).group(1)) / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StepMeter:
    """Times the optimizer steps after ``warmup``; call :meth:`step_done` after every step (1-based)."""

    def __init__(self, warmup: int) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.warmup = warmup
        self.rss_after_imports = rss_mib()
        self.t0 = self.t1 = None
        self.cpu0 = self.cpu1 = 0.0
        self.loads: list[float] = []
        self.step_times: list[float] = []
        self._last: float | None = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def step_done(self, step: int) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step == self.warmup:
            self.t0, self.cpu0, self.loads = now, cpu_seconds(), [os.getloadavg()[0]]
        elif step > self.warmup:
            self.step_times.append(now - (self._last if self._last is not None else now))
            self.loads.append(os.getloadavg()[0])
        self._last = now
        self.t1, self.cpu1 = now, cpu_seconds()

    def result(self) -> dict:
        """Seconds, CPU seconds, load and memory of the measured steps (call once training is over)."""
        import torch

        out = {
            "seconds": (self.t1 - self.t0) if self.t0 is not None else float("nan"),
            "cpu_seconds": self.cpu1 - self.cpu0,
            "step_seconds": self.step_times,
            "load": max(self.loads, default=float("nan")),
            "threads": torch.get_num_threads(),
            "rss_after_imports_mib": self.rss_after_imports,
            "peak_rss_mib": rss_mib("VmHWM"),
        }
        out["train_rss_mib"] = out["peak_rss_mib"] - self.rss_after_imports
        if self.cuda:
            out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
            out["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        return out


def matmul_peak(dtype_name: str = "float32", size: int | None = None, seconds: float = 1.5) -> dict:
    """Dense matmul throughput (FLOP/s): the best of repeated ``size`` x ``size`` products over ~``seconds``."""
    import torch

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = size or (8192 if device == "cuda" else 2048)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: thread pool, kernels
    best, spent, reps = 0.0, 0.0, 0
    while spent < seconds or reps < 3:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4 if device == "cuda" else 1):
            torch.matmul(a, b, out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        best = max(best, (4 if device == "cuda" else 1) * 2 * size**3 / dt)
        spent, reps = spent + dt, reps + 1
    return {"dtype": dtype_name, "size": size, "device": device, "flops": best, "reps": reps,
            "threads": torch.get_num_threads()}  # fmt: skip


if __name__ == "__main__":  # python meter.py --peak float32 [bfloat16 ...] [--seconds S] [--size N]: a JSON line each
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--peak", nargs="+", required=True, metavar="DTYPE")
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--size", type=int, default=None)
    args = parser.parse_args()
    for name in args.peak:
        print(json.dumps(matmul_peak(name, args.size, args.seconds)), flush=True)


def training_summary(trainer) -> dict:
    """What an HF-Trainer-based worker trained: logged losses, trainable tensor sizes, bitsandbytes modules."""
    model = trainer.model
    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "trainable": {n: p.numel() for n, p in model.named_parameters() if p.requires_grad},
        "quantized": [n for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")],
    }
