"""What ``qlora-med bench`` prints and writes: per (mix, variant) medians and spreads, the markdown table, JSON, CSV
and a plot. Numbers come from the workers' raw measurements (:class:`qlora_med.bench.suite.Run`)."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_med.bench.flops import Trained, steps_flops
from qlora_med.bench.suite import BenchResult, Run

PARTS = (("language_model", "LLM"), ("vision_tower", "CLIP"), ("multi_modal_projector", "projector"))


def _parts(names: list[str] | dict, lora: bool | None) -> list[str]:
    out = []
    for key, label in PARTS:
        if any(key in n and (lora is None or ("lora_" in n) == lora) for n in names):
            out.append(label)
    return out


@dataclass
class Summary:
    """One (mix, variant): per-round values and what the variant trains."""

    mix: str
    variant: str
    what: str
    runs: list[Run]
    mfu: list[float]
    hfu: list[float]
    x_base: list[float] = dataclasses.field(default_factory=list)  # tok/s over the baseline's in the same round

    def _values(self, key: str) -> list[float]:
        return [r.data[key] for r in self.runs if r.data.get(key) is not None]

    @property
    def tok_s(self) -> list[float]:
        return [r.tokens_per_s for r in self.runs]

    @property
    def first(self) -> dict[str, Any]:
        return self.runs[0].data

    def median(self, key: str) -> float:
        lists = {"tok_s": self.tok_s, "mfu": self.mfu, "hfu": self.hfu, "x_base": self.x_base}
        values = lists[key] if key in lists else self._values(key)
        return statistics.median(values) if values else float("nan")

    @property
    def lora_on(self) -> str:
        lora = _parts(self.first["trainable"], True)
        full = [p for p in _parts(self.first["trainable"], False)]
        return " + ".join([f"LoRA {'+'.join(lora)}"] * bool(lora) + [f"full {'+'.join(full)}"] * bool(full))

    @property
    def nf4(self) -> str:
        return "+".join(_parts(self.first["quantized"], None)) or "none"

    def _measured_sum(self, key: str) -> int:
        return sum(b[key] for r in self.runs for b in r.measured)

    @property
    def loss_share(self) -> float:
        return self._measured_sum("labelled") / sum(r.tokens for r in self.runs)

    @property
    def padding(self) -> float:
        return self._measured_sum("padded") / sum(r.tokens for r in self.runs)

    @property
    def cpu_use(self) -> float:
        return min(r.data["cpu_seconds"] / (r.data["seconds"] * r.data["threads"]) for r in self.runs)


def summarise(result: BenchResult) -> list[Summary]:
    from qlora_med.plan.recipe import shape_from_config_dict

    spec = result.spec
    shape = shape_from_config_dict(json.loads((Path(result.model_dir) / "config.json").read_text()))
    peak = result.peaks.get(result.compute_dtype, {}).get("flops")
    what = {v.name: v.what for v in result.variants}
    out = []
    for mix in spec.mixes:
        base = {r.round: r.tokens_per_s for r in result.runs if r.mix == mix and r.variant == "baseline"}
        for v in result.variants:
            runs = [r for r in result.runs if r.mix == mix and r.variant == v.name]
            if not runs:
                continue
            x_base = [r.tokens_per_s / base[r.round] for r in runs if r.round in base]  # paired: drift cancels
            mfu, hfu = [], []
            for r in runs:
                trained = Trained.from_result(r.data["trainable"], r.data["checkpointing"])
                model_flops, hw_flops = steps_flops(shape, r.measured, trained)
                if peak:
                    mfu.append(model_flops / r.data["seconds"] / peak)
                    hfu.append(hw_flops / r.data["seconds"] / peak)
            out.append(Summary(mix, v.name, what[v.name], runs, mfu, hfu, x_base))
    return out


def _share(checkpointing: bool | float) -> str:
    """A variant's checkpointing: on, off, or the share of decoder layers checkpointed."""
    return "on" if checkpointing == 1 else "off" if not checkpointing else f"{float(checkpointing):.0%} of layers"


def rows(summaries: list[Summary]) -> list[dict[str, str]]:
    out = []
    for s in summaries:
        tok = s.tok_s
        row = {
            "variant": s.variant, "trains": s.lora_on, "NF4": s.nf4, "loss on": f"{s.loss_share:.0%} of tokens",
            "padded/real": f"{s.padding:.2f}", "ckpt": _share(s.first["checkpointing"]),
            "tok/s": f"{s.median('tok_s'):,.0f}", "min-max": f"{min(tok):,.0f}-{max(tok):,.0f}",
            "x base": f"{s.median('x_base'):.2f}" if s.x_base else "",
            "x base min-max": f"{min(s.x_base):.2f}-{max(s.x_base):.2f}" if s.x_base else "",
            "peak RSS MiB": f"{s.median('peak_rss_mib'):,.0f}", "train MiB": f"{s.median('train_rss_mib'):,.0f}",
        }  # fmt: skip
        if "cuda_peak_allocated_mib" in s.first:
            row["GPU peak MiB"] = f"{s.median('cuda_peak_allocated_mib'):,.0f}"
        row.update({"MFU": f"{s.median('mfu'):.1%}" if s.mfu else "", "HFU": f"{s.median('hfu'):.1%}" if s.hfu else "",
                    "s/step": f"{statistics.median(t for r in s.runs for t in r.data['step_seconds']):.2f}",
                    "loss@1": f"{s.first['losses'][0]:.4f}"})  # fmt: skip
        out.append(row)
    return out


def markdown_table(rows_: list[dict[str, str]]) -> str:
    if not rows_:
        return "(no results)"
    cols = list(rows_[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows_]
    return "\n".join(lines)


def contention(summaries: list[Summary]) -> str | None:
    """A warning when other processes competed: a 1-minute load average above the core count during measured steps
    (the worker itself adds at most its threads; CPU use below 100% alone is no sign: decoding, tokenizing and the
    Python between kernels run on one thread)."""
    if not summaries:
        return None
    load = max(r.data["load"] for s in summaries for r in s.runs)
    cores = os.cpu_count() or 1
    if load > cores + 0.5:
        low = min(s.cpu_use for s in summaries)
        return (f"CONTENDED: 1-min load up to {load:.1f} on {cores} cores during measured steps (lowest CPU use "
                f"{low:.0%} of a worker's threads): wall-time numbers are inflated and spread; re-run on a quiet "
                "machine")  # fmt: skip
    return None


def header(result: BenchResult) -> str:
    spec, w = result.spec, result.workload
    peaks = ", ".join(f"{k} {v['flops'] / 1e9:,.0f} GFLOP/s" for k, v in result.peaks.items())
    lines = [
        f"qlora-med bench: {spec.model_name} LLaVA ({spec.image_tokens} image tokens per image), batch {spec.batch_size}, "
        f"{spec.steps} measured step(s) after {spec.warmup} warm-up, {spec.rounds} interleaved round(s), compute "
        f"{result.compute_dtype}; {result.hardware}; matmul peak {peaks or 'not measured'}",
    ]  # fmt: skip
    for mix in spec.mixes:
        s = w[mix]
        lines.append(
            f"{mix}: {s['samples']} samples, text tokens median {s['text_tokens']['median']:.0f} / p90 "
            f"{s['text_tokens']['p90']:.0f} / max {s['text_tokens']['max']} (template {s['template']}), "
            f"+ {spec.image_tokens} image tokens; rounds {s['rounds']}; {s['truncated']} truncated"
        )
    sizes = ", ".join(f"{i['width']}x{i['height']}" for i in w["images"])
    lines.append(f"images: {len(w['images'])} real, decoded and padded to square every step ({sizes})")
    return "\n".join(lines)


LEGEND = (
    "tok/s: real (non-pad) tokens, image tokens included, per second of wall time over the measured steps (data "
    "loading and collation included): median over rounds, min-max beside it. x base: tok/s over the baseline's in "
    "the same round (paired, so drift of the machine between rounds cancels): median and min-max. peak RSS: the worker's VmHWM over its "
    "whole life (imports, model load, training); train MiB: that peak minus the RSS after imports. MFU / HFU: model "
    "FLOPs without / with checkpointing's recompute (qlora_med.bench.flops) per second over the matmul peak of the "
    "compute dtype. trains / NF4 / loss on: read from each worker's model and batches. padded/real: tokens computed "
    "per real token."
)


def to_json(result: BenchResult, summaries: list[Summary]) -> dict:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "hardware": result.hardware,
        "versions": result.versions, "spec": dataclasses.asdict(result.spec), "compute_dtype": result.compute_dtype,
        "matmul_peak": result.peaks, "workload": result.workload, "wall_s": result.wall_s,
        "contention": contention(summaries),
        "variants": [dataclasses.asdict(v) for v in result.variants],
        "table": rows(summaries),
        "summary": [{"mix": s.mix, "variant": s.variant, "tok_s": s.tok_s, "x_base": s.x_base, "mfu": s.mfu, "hfu": s.hfu,
                     "peak_rss_mib": s._values("peak_rss_mib"), "train_rss_mib": s._values("train_rss_mib"),
                     "loss_share": s.loss_share, "padding": s.padding, "cpu_use_min": s.cpu_use}
                    for s in summaries],
        "runs": [{"round": r.round, "mix": r.mix, "variant": r.variant,
                  **{k: v for k, v in r.data.items() if k not in ("trainable", "quantized")},
                  "trainable_params": sum(r.data["trainable"].values()), "quantized_modules": len(r.data["quantized"])}
                 for r in result.runs],
    }  # fmt: skip


def render(result: BenchResult, summaries: list[Summary]) -> str:
    parts = [header(result)]
    warning = contention(summaries)
    if warning:
        parts.append(warning)
    for mix in result.spec.mixes:
        mix_rows = rows([s for s in summaries if s.mix == mix])
        parts.append(f"\n### {mix}\n\n{markdown_table(mix_rows)}")
    parts.append("\n" + LEGEND)
    return "\n".join(parts)


def write_outputs(result: BenchResult, summaries: list[Summary], out: Path, csv_path: Path | None) -> list[Path]:
    """bench.md, bench.json, bench.png under ``out``; one CSV row per (mix, variant) appended to ``csv_path``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench.md", out / "bench.json"]
    written[0].write_text(render(result, summaries) + "\n")
    written[1].write_text(json.dumps(to_json(result, summaries), indent=1))
    if plot(summaries, out / "bench.png"):
        written.append(out / "bench.png")
    if csv_path is not None:
        append_csv(csv_path, result, summaries)
        written.append(csv_path)
    return written


def append_csv(path: Path, result: BenchResult, summaries: list[Summary]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    spec = result.spec
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "hardware": result.hardware,
            **result.versions, "model": spec.model_name, "batch": spec.batch_size, "steps": spec.steps,
            "rounds": spec.rounds, "dtype": result.compute_dtype,
            "contended": bool(contention(summaries))}  # fmt: skip
    with path.open("a", newline="") as f:
        writer = None
        for s, row in zip(summaries, rows(summaries), strict=True):
            record = {**meta, "mix": s.mix, **row}
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(record), extrasaction="ignore")
                if new:
                    writer.writeheader()
            writer.writerow(record)


def plot(summaries: list[Summary], path: Path) -> bool:
    """Median tokens/s with min-max bars and peak RSS, one row per mix; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    mixes = list(dict.fromkeys(s.mix for s in summaries))
    fig, axes = plt.subplots(len(mixes), 2, figsize=(10, 2.2 + 1.6 * len(mixes)), squeeze=False, dpi=100)
    for row, mix in enumerate(mixes):
        group = [s for s in summaries if s.mix == mix]
        names = [s.variant for s in group]
        med = [s.median("tok_s") for s in group]
        err = [[m - min(s.tok_s) for m, s in zip(med, group, strict=True)],
               [max(s.tok_s) - m for m, s in zip(med, group, strict=True)]]  # fmt: skip
        axes[row][0].barh(names, med, xerr=err, color="tab:blue", capsize=3)
        axes[row][0].set(xlabel="real tokens/s (median, min-max)", title=mix)
        axes[row][1].barh(names, [s.median("peak_rss_mib") for s in group], color="tab:gray", label="peak RSS")
        axes[row][1].barh(names, [s.median("train_rss_mib") for s in group], color="tab:orange", label="training")
        axes[row][1].set(xlabel="MiB", title=f"{mix}: memory")
        axes[row][1].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
