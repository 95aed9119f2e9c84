"""``qlora-med bench``: tokens/s, peak memory and MFU of the kit vs a hand-written QLoRA loop and TRL, on curriculum-like
data, each variant in its own process, repeated and interleaved; ``--profile``: where a kit step's time goes."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

NAME = "bench"
HELP = "measure tokens/s, peak memory and MFU: the kit vs a hand-written QLoRA loop and TRL (or --profile a kit step)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=None, help="interleaved repetitions of every variant (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="measured optimizer steps per run (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (default 1, at least 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per micro-batch (default 4)")
    parser.add_argument("--max-length", type=int, default=2048, help="token limit incl. image tokens (default 2048)")
    parser.add_argument("--mix", nargs="+", choices=("align", "instruct"), default=None,
                        help="workloads (default: both)")  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=None,
                        help="variants to run, or 'all' (default: baseline trl kit kit_padded kit_ckpt)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small model, batch 2, 1 step, 2 rounds, instruct mix only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: all cores)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="where bench.md, bench.json and bench.png go (default benchmarks/results)")
    parser.add_argument("--csv", type=Path, default=None,
                        help="append one row per result here (default OUT/bench_history.csv)")
    parser.add_argument("--no-csv", action="store_true", help="write no CSV row")
    parser.add_argument("--compare", type=Path, default=None, metavar="BENCH_JSON",
                        help="an earlier run's bench.json: check that this run reproduces it within its min-max "
                             "(OUT/compare.md, also appended to bench.md)")
    parser.add_argument("--against", type=Path, default=None, metavar="BENCH_JSON",
                        help="with --compare: check this later run's bench.json instead of running anything "
                             "(writes OUT/compare.md)")
    parser.add_argument("--readme", type=Path, default=None, metavar="README",
                        help="refresh README's copies of this run's bench.md and compare.md (the blocks between "
                             "'<!-- copy of PATH -->' and '<!-- end of PATH -->')")
    parser.add_argument("--profile", action="store_true",
                        help="instead: torch.profiler over a few CPU training steps of the kit (the first kit variant "
                             "of --variants); top ops and the share of time in NF4 dequant, LoRA, loss and optimizer; "
                             "writes OUT/profile.txt and profile.json")  # fmt: skip
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps after one warm-up (default 3)")


def _bench_json(path: Path, option: str = "--compare") -> dict:
    """A bench.json given to ``option``, or one line saying what is wrong with it."""
    import json

    from qlora_med.errors import ConfigError

    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"bench {option} {path}: cannot read it as JSON ({err}); give a bench.json that "
                          "`qlora-med bench` wrote") from None  # fmt: skip
    if not isinstance(report, dict) or not isinstance(report.get("summary"), list):
        raise ConfigError(f"bench {option} {path}: no 'summary' list; give a bench.json that `qlora-med bench` wrote")
    return report


def main(args: argparse.Namespace) -> int:
    import dataclasses

    from qlora_med.bench.suite import QUICK, VARIANTS, BenchSpec
    from qlora_med.errors import ConfigError

    spec = BenchSpec(warmup=args.warmup, max_length=args.max_length)
    if args.quick:
        spec = dataclasses.replace(spec, model=QUICK, model_name="quick", batch_size=2, steps=1, rounds=2,
                                   mixes=("instruct",))  # fmt: skip
    spec = dataclasses.replace(
        spec,
        rounds=args.rounds or spec.rounds, steps=args.steps if args.steps is not None else spec.steps,
        batch_size=args.batch_size or spec.batch_size, mixes=tuple(args.mix or spec.mixes),
    )  # fmt: skip
    if min(spec.rounds, spec.steps, spec.warmup, spec.batch_size) <= 0 or spec.max_length <= spec.image_tokens + 8:
        raise ConfigError("bench: --rounds, --steps, --warmup and --batch-size must be positive (warm-up at least 1: "
                          "the first step is never timed), --max-length above the image tokens")  # fmt: skip
    known = {v.name: v for v in VARIANTS}
    names = args.variants or [v.name for v in VARIANTS if v.default]
    if names == ["all"]:
        names = list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigError(f"bench: unknown variants {unknown}; choose from {sorted(known)} or 'all'")
    if args.profile:
        import json

        from qlora_med.bench.profiling import format_profile, profile_kit

        variant = next((n for n in names if n.startswith("kit")), "kit")
        profile = profile_kit(spec, steps=args.profile_steps, threads=args.threads, variant=variant)
        text = format_profile(profile)
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.txt").write_text(text + "\n")
        (args.out / "profile.json").write_text(json.dumps(profile, indent=1))
        print(f"\nwrote {args.out / 'profile.txt'} and {args.out / 'profile.json'}")
        return 0

    earlier = _bench_json(args.compare) if args.compare else None  # read now: this run may overwrite the file
    if args.against is not None and earlier is None:
        raise ConfigError("bench --against needs --compare EARLIER/bench.json: the run to check it against")
    if args.readme is not None:
        from qlora_med.bench.embed import check

        compared = [args.out / "compare.md"] if earlier else []
        check(args.readme, compared if args.against else [args.out / "bench.md", *compared])
    start = time.time()
    written: list[Path] = []
    if args.against is None:
        from qlora_med.bench.report import render, summarise, to_json, write_outputs
        from qlora_med.bench.suite import run_bench

        result = run_bench(spec, [known[n] for n in names], args.threads)
        summaries = summarise(result)
        print(render(result, summaries))
        csv_path = None if args.no_csv else (args.csv or args.out / "bench_history.csv")
        written = write_outputs(result, summaries, args.out, csv_path)
    if earlier is not None:
        from qlora_med.bench import rerun
        from qlora_med.io import atomic_write_text

        now = _bench_json(args.against, "--against") if args.against else to_json(result, summaries)
        section = rerun.render(earlier, now, rerun.compare(earlier, now), str(args.compare))
        print(section)
        if args.against is None:
            with (args.out / "bench.md").open("a") as f:
                f.write(section + "\n")
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "compare.md", section.lstrip("\n") + "\n")
        written.append(args.out / "compare.md")
    if args.readme is not None:
        from qlora_med.bench.embed import refresh

        refreshed = refresh(args.readme, [p for p in written if p.suffix == ".md"])
        print(f"refreshed {args.readme}: {', '.join(refreshed)}")
    print(f"\n{time.time() - start:.0f} s in all; wrote {', '.join(str(p) for p in written)}")
    return 0
