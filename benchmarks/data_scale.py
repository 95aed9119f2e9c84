"""Data at paper scale: convert a 500K-record alignment file once, reload it, and keep up with training.

Measures, on a synthetic file in the real schema (``make_synthetic_alignment.py``):
  1. conversion (check + tokenize with ``Dataset.map(num_proc)``) into the Arrow cache: time, peak RSS
     of the converting process and of its map workers, cache size;
  2. cached reload (hash the file, memory-map the entry): time and RSS;
  3. image decode + preprocessing by the collator on batches of 16: samples per CPU-second, with the
     tiny model's 56 px processor, LLaVA-Med v1.5's 336 px one, and 336 px from 1024x768 JPEG figures;
  4. the tiny model's training step (stage 1 through ``qlora-med run``, 1 DataLoader worker) and the
     time from process start to the first optimizer step on the cached data (target < 60 s).
Steps 1, 2 and 4 run in fresh processes so their memory and start-up are their own. Prints a table
and appends a row to ``benchmarks/results/data_scale.csv``.

    python benchmarks/data_scale.py                 # 500K records, ~6 min on 2 cores
    python benchmarks/data_scale.py --n 20000 --steps 6
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "data_scale.csv"
MAX_LENGTH = 2048
BATCH = 4


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (robust to other load on the machine)."""
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def _stage(data: Path, images: Path):
    from qlora_med.config.schema import DataConfig, StageConfig

    return StageConfig(name="align", kind="align", max_length=MAX_LENGTH,
                       data=DataConfig(path=str(data), image_folder=str(images)))


# ---------------------------------------------------------------- child processes


def child_build(data: Path, images: Path, model: Path, cache: Path, num_proc: int | None, out: Path) -> None:
    """Build (or reload) the stage dataset; write timings and memory to ``out``."""
    from transformers import AutoProcessor

    from qlora_med.data.build import build_stage_dataset

    processor = AutoProcessor.from_pretrained(model)
    base, cpu = _rss_mb(), _cpu_s()
    start = time.perf_counter()
    dataset, stats = build_stage_dataset(_stage(data, images), processor, 16, "<image>", 42, cache, num_proc)
    seconds = time.perf_counter() - start
    source = stats.sources[0]
    entry = Path(source.cache)
    out.write_text(json.dumps({
        "seconds": seconds, "cpu_s": _cpu_s() - cpu, "samples": len(dataset), "hit": source.cache_hit, "num_proc": source.num_proc,
        "check_s": source.check_seconds, "tokenize_s": source.tokenize_seconds, "tokens": source.tokens,
        "truncated": source.truncated, "base_rss_mb": base, "rss_mb": _rss_mb(),
        "peak_mb": _peak_mb(resource.RUSAGE_SELF), "children_peak_mb": _peak_mb(resource.RUSAGE_CHILDREN),
        "cache_mb": sum(p.stat().st_size for p in entry.iterdir()) / 2**20,
    }))


def child_train(recipe: Path, out: Path) -> None:
    """Run the recipe, recording the wall-clock time at the end of every optimizer step."""
    import logging

    from transformers.trainer_callback import CallbackHandler

    from qlora_med.config.loader import load_recipe
    from qlora_med.train.runner import run_recipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stamps: list[float] = []
    original = CallbackHandler.on_step_end

    def on_step_end(self, args, state, control):
        stamps.append(time.time())
        return original(self, args, state, control)

    CallbackHandler.on_step_end = on_step_end
    run_recipe(load_recipe(recipe))
    out.write_text(json.dumps({"stamps": stamps, "peak_mb": _peak_mb(resource.RUSAGE_SELF)}))


# ---------------------------------------------------------------- parent


def _run_child(args: list[str], log: Path) -> float:
    """Run this script in a fresh process; returns the wall time from before the start."""
    start = time.time()
    with log.open("a") as fh:
        subprocess.run([sys.executable, __file__, *args], check=True, stdout=fh, stderr=subprocess.STDOUT)
    return start


def decode_rate(dataset, processor, images: list[str] | None = None, batches: int = 40) -> float:
    """Collator samples per CPU-second on one thread (rows fetched at random, batches of 16).

    CPU time, not wall time: other processes on a shared machine do not lower it.
    """
    import numpy as np
    import torch

    from qlora_med.data.collate import VisionCollator

    torch.set_num_threads(1)
    collator = VisionCollator(processor, "pad")
    rng = np.random.default_rng(0)
    rows = rng.choice(len(dataset), size=16 * batches, replace=False)
    collator([dataset[int(i)] for i in rows[:16]])  # warm-up
    start = time.process_time()
    for b in range(batches):
        features = [dataset[int(i)] for i in rows[16 * b : 16 * (b + 1)]]
        if images:
            features = [{**f, "image": images[k % len(images)]} for k, f in enumerate(features)]
        collator(features)
    return 16 * batches / (time.process_time() - start)


def _big_figures(folder: Path, n: int = 4) -> list[str]:
    """1024x768 JPEGs with smooth structure and noise (PMC figures are often about this size)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:768, 0:1024]
    paths = []
    for i in range(n):
        base = 127 + 100 * np.sin(x / (40 + 10 * i)) * np.cos(y / 55)
        pixels = np.clip(base[..., None] + rng.normal(0, 20, (768, 1024, 3)), 0, 255).astype(np.uint8)
        paths.append(str(folder / f"figure_{i}.jpg"))
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def _recipe(work: Path, data: Path, images: Path, steps: int) -> Path:
    import yaml

    recipe = {
        "output_dir": str(work / "run"), "seed": 42,
        "model": {"name_or_path": str(work / "tiny-llava"), "tiny": {}, "quantization": "nf4",
                  "cache_dir": str(work / "cache")},
        "stages": [{"name": "align", "kind": "align", "data": {"path": str(data), "image_folder": str(images)},
                    "learning_rate": 5e-3, "projector_lr": 5e-3, "max_steps": steps, "per_device_batch_size": BATCH,
                    "max_length": MAX_LENGTH, "logging_steps": 1, "save_steps": 100_000, "dataloader_workers": 1}],
    }
    path = work / "recipe.yaml"
    path.write_text("# data_scale benchmark: stage 1 on the synthetic file\n" + yaml.safe_dump(recipe))
    return path


def _hardware() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {mem:.0f} GiB"


def _versions() -> dict[str, str]:
    import datasets
    import pyarrow
    import tokenizers
    import torch
    import transformers

    return {"python": platform.python_version(), "datasets": datasets.__version__, "pyarrow": pyarrow.__version__,
            "tokenizers": tokenizers.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_build":
        child_build(Path(argv[1]), Path(argv[2]), Path(argv[3]), Path(argv[4]),
                    int(argv[5]) if argv[5] != "auto" else None, Path(argv[6]))
        return 0
    if argv and argv[0] == "_train":
        child_train(Path(argv[1]), Path(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500_000, help="records in the synthetic file")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-med-data-scale"), help="scratch folder")
    parser.add_argument("--num-proc", default="auto", help="tokenization processes (default: auto)")
    parser.add_argument("--steps", type=int, default=12, help="training steps to time")
    parser.add_argument("--csv", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from qlora_med.config.schema import TinyModelConfig
    from qlora_med.model.build import build_tiny, make_processor

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "benchmark.log"
    data, images = work / f"alignment_{args.n}.json", work / "images"
    if not data.is_file():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_synthetic_alignment.py"), "--out", str(data),
                        "--image-dir", str(images), "--n", str(args.n)], check=True)
    model = work / "tiny-llava"
    if not (model / "config.json").is_file():
        build_tiny(TinyModelConfig(), model)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(work / "run", ignore_errors=True)
    results = {}
    for phase in ("convert", "reload"):
        out = work / f"{phase}.json"
        _run_child(["_build", str(data), str(images), str(model), str(cache / "data"), args.num_proc, str(out)], log)
        results[phase] = json.loads(out.read_text())
    assert not results["convert"]["hit"] and results["reload"]["hit"]

    from transformers import AutoProcessor

    from qlora_med.data.build import build_stage_dataset

    processor = AutoProcessor.from_pretrained(model)
    dataset, _ = build_stage_dataset(_stage(data, images), processor, 16, "<image>", 42, cache / "data")
    processor_336 = make_processor(processor.tokenizer, 336, 14, "<image>")
    rates = {
        "56px": decode_rate(dataset, processor),
        "336px": decode_rate(dataset, processor_336),
        "336px_from_1024x768": decode_rate(dataset, processor_336, _big_figures(work / "figures"), batches=10),
    }

    out = work / "train.json"
    started = _run_child(["_train", str(_recipe(work, data, images, args.steps)), str(out)], log)
    train = json.loads(out.read_text())
    stamps = train["stamps"]
    steps = sorted(b - a for a, b in zip(stamps[1:], stamps[2:], strict=False))  # skip the first step
    step_s = steps[len(steps) // 2]
    consume = BATCH / step_s
    size_mb = data.stat().st_size / 1e6
    row = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "hardware": _hardware(),
        "load_avg_1m": round(os.getloadavg()[0], 2), **_versions(), "records": args.n, "file_mb": round(size_mb, 1),
        "num_proc": results["convert"]["num_proc"], "convert_s": round(results["convert"]["seconds"], 1),
        "convert_cpu_s": round(results["convert"]["cpu_s"], 1),
        "check_s": results["convert"]["check_s"], "tokenize_s": results["convert"]["tokenize_s"],
        "convert_peak_rss_mb": round(results["convert"]["peak_mb"]),
        "convert_worker_peak_rss_mb": round(results["convert"]["children_peak_mb"]),
        "convert_base_rss_mb": round(results["convert"]["base_rss_mb"]),
        "cache_mb": round(results["convert"]["cache_mb"]), "reload_s": round(results["reload"]["seconds"], 2),
        "reload_rss_mb": round(results["reload"]["rss_mb"]),
        "reload_base_rss_mb": round(results["reload"]["base_rss_mb"]),
        **{f"decode_sps_core_{k}": round(v, 1) for k, v in rates.items()},
        "train_step_s": round(step_s, 3), "train_consumes_sps": round(consume, 1),
        "loading_vs_training": round(rates["56px"] / consume, 1),
        "time_to_first_step_s": round(stamps[0] - started, 1),
        "train_peak_rss_mb": round(train["peak_mb"]),
    }
    width = max(map(len, row))
    sys.stdout.write("\n".join(f"{k:<{width}}  {v}" for k, v in row.items()) + "\n")
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new = not args.csv.is_file()
    with args.csv.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    sys.stdout.write(f"appended to {args.csv}; logs in {log}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
