"""``qlora-med bench``: tokens/s and peak training memory, hand-written QLoRA loop vs the kit, plus ablations."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

NAME = "bench"
HELP = "measure real-token throughput and peak memory: a plain transformers+peft QLoRA loop vs the kit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps", type=int, default=None, help="measured optimizer steps per variant (default 5)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (default 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per micro-batch (default 4)")
    parser.add_argument(
        "--max-length", type=int, default=None, help="longest sample in tokens (default 1024)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1-minute smoke: small model, max length 512, batch 2, 1 step, baseline and kit only",
    )
    parser.add_argument("--variants", nargs="+", default=None, help="subset of variants (default: all)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: all cores)"
    )
    parser.add_argument(
        "--csv",
        type=Path,
        default=Path("benchmarks/results/bench.csv"),
        help="append the results here (default benchmarks/results/bench.csv)",
    )
    parser.add_argument("--no-csv", action="store_true", help="print only")


def main(args: argparse.Namespace) -> int:
    import dataclasses

    from qlora_med.bench.suite import (
        QUICK,
        VARIANTS,
        BenchSpec,
        append_csv,
        format_table,
        hardware,
        run_bench,
        table,
    )
    from qlora_med.errors import ConfigError

    spec = BenchSpec(batch_size=args.batch_size, warmup=args.warmup)
    names = args.variants
    if args.quick:
        spec = dataclasses.replace(
            spec, model=QUICK, model_name="quick", max_length=512, batch_size=2, steps=1
        )
        names = names or ["baseline", "kit"]
    spec = dataclasses.replace(
        spec,
        steps=spec.steps if args.steps is None else args.steps,
        max_length=spec.max_length if args.max_length is None else args.max_length,
    )
    if spec.steps <= 0 or spec.warmup < 0 or spec.batch_size <= 0 or spec.max_length <= spec.image_tokens + 8:
        raise ConfigError(
            "bench: --steps and --batch-size must be positive, --max-length above the image tokens"
        )
    known = {v.name: v for v in VARIANTS}
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ConfigError(f"bench: unknown variants {unknown}; choose from {sorted(known)}")
    variants = [known[n] for n in names] if names else list(VARIANTS)
    start = time.time()
    results = run_bench(spec, variants, args.threads)
    rows = table(results)
    print(f"qlora-med bench: {spec.model_name} LLaVA, batch {spec.batch_size}, samples up to {spec.max_length} "
          f"tokens ({spec.image_tokens} image tokens), {spec.steps} measured steps after {spec.warmup} warm-up; "
          f"{hardware()}\n")  # fmt: skip
    print(format_table(rows))
    print(
        f"\n{time.time() - start:.0f} s in all. tok/s: real (non-pad) tokens, image tokens included, per second of "
        "wall time over the measured steps; tok/CPU-s: the same per CPU-second of the worker (all threads), which "
        "other processes on the machine barely change. CPU use: CPU-seconds / (wall x threads); well below 100% "
        "(and load above the core count) means other processes competed and wall-time figures are inflated. "
        "train MiB: peak RSS during the measured steps minus RSS after imports (CPU) / max_memory_allocated "
        "(CUDA). x base: vs the hand-written loop; vs kit: this ablation vs the kit."
    )
    if not args.no_csv:
        append_csv(args.csv, spec, results, rows)
        print(f"appended {len(rows)} rows to {args.csv}")
    return 0
