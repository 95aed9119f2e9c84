"""The GPU check's report: the 8xA100 curriculum extrapolation (assumptions stated) and the markdown tables."""

from __future__ import annotations

import math

A100_BF16_MATMUL_TFLOPS = 290.0  # assumed: what the same matmul loop reaches on an A100 (312 nominal)
DDP_EFFICIENCY = 0.9  # assumed for 8 GPUs on one node (NVLink), accumulation 1 at micro-batch 16
CURRICULUM = {"align": (500_000, 1), "instruct": (60_000, 3)}  # samples, epochs (LLaVA-Med v1.5)


def extrapolate(rows: list[dict], bench: dict, matmul_tflops: float | None, image_tokens: int) -> dict:
    """8xA100 curriculum wall time from the kit's measured tokens/s (the 24 GB recipe's, else the bench's)."""
    from qlora_med.bench.workloads import CAPTION, CONVERSATION

    measured = next((r["tokens_per_s"] for r in rows if r.get("fits")), None) or bench.get("kit", {}).get("tokens_per_s")
    if not measured or not matmul_tflops:
        return {"skipped": "no measured kit step or matmul peak"}
    a100 = measured * A100_BF16_MATMUL_TFLOPS / matmul_tflops
    mean = {"align": image_tokens + 3 + CAPTION.median * math.exp(CAPTION.sigma**2 / 2),
            "instruct": image_tokens + 30 + CONVERSATION.median * math.exp(CONVERSATION.sigma**2 / 2)}
    stages = {}
    for stage, (samples, epochs) in CURRICULUM.items():
        tokens = samples * epochs * mean[stage]
        stages[stage] = {"samples": samples, "epochs": epochs, "mean_tokens": round(mean[stage]), "tokens": tokens,
                         "hours": tokens / (a100 * 8 * DDP_EFFICIENCY) / 3600}  # fmt: skip
    return {
        "measured_tokens_per_s": measured, "this_gpu_matmul_tflops": matmul_tflops,
        "a100_tokens_per_s": a100, "stages": stages, "total_hours": sum(s["hours"] for s in stages.values()),
        "assumptions": [
            f"step time scales with dense bf16 matmul throughput: an A100 reaches {A100_BF16_MATMUL_TFLOPS:g} TFLOP/s "
            "in the same loop this GPU was measured with",
            "tokens/s at seq 2048 (every sample full) holds for the curriculum's shorter samples, i.e. time "
            "proportional to real tokens (padding-free); padded batches cost 1.3-1.6x more (CPU bench padded/real)",
            f"8 GPUs in DDP at {DDP_EFFICIENCY:.0%} scaling efficiency, micro-batch 16, no data-loading stalls",
            f"mean sample length from the bench's length models plus {image_tokens} image tokens; LLaVA-Med v1.5's "
            "curriculum: 500K align samples x 1 epoch, 60K instruct x 3 epochs",
        ],
    }  # fmt: skip


def to_markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']}", "", f"{report['when']}; {report.get('model', {})}", ""]
    t = report.get("pytest")
    if t:
        lines += [f"pytest -m gpu: rc {t.get('rc')}, {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                  f"{t.get('skipped', 0)} skipped ({t.get('seconds')} s)", ""]  # fmt: skip
    lines += ["| recipe | card | micro x accum | ckpt layers | fits | measured alloc GiB | plan alloc (full CE / fused) GiB | "
              "reserved GiB | step s | tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report.get("recipes", []):
        if "skipped" in r:
            lines.append(f"| {r['recipe']} | skipped: {r['skipped']} |||||||||")
            continue
        alloc = r.get("measured_alloc_gib", r.get("measured_peak_rss_gib", float("nan")))
        lines.append(f"| {r['recipe']} | {r['card_gib']:g} GB | {r['micro_batch']} x {r['accumulation']} | "
                     f"{r['checkpointed_layers']} | {r.get('fits')} | {alloc:.2f} | "
                     f"{r['plan_alloc_gib_full_ce']:.2f} / {r['plan_alloc_gib_fused_ce']:.2f} | "
                     f"{r.get('measured_reserved_gib', float('nan')):.2f} | {r.get('step_s', float('nan')):.2f} | "
                     f"{r.get('tokens_per_s', float('nan')):,.0f} |")  # fmt: skip
    b = report.get("bench", {})
    if b:
        lines += ["", f"| seq {report['spec']['seq']}, batch {report['spec']['bench_batch']} | tok/s | peak GPU alloc GiB "
                  "| peak RSS GiB | loss@1 |", "|---|---|---|---|---|"]  # fmt: skip
        for name, r in b.items():
            if "skipped" in r:
                lines.append(f"| {name} | skipped: {r['skipped']} ||||")
            else:
                lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['peak_gpu_alloc_gib']:.2f} | "
                             f"{r['peak_rss_gib']:.2f} | {r['loss_first']:.4f} |")  # fmt: skip
    e = report.get("extrapolation", {})
    if "stages" in e:
        lines += ["", f"8xA100 curriculum (extrapolated): {e['total_hours']:.1f} h = " + " + ".join(
            f"{k} {v['hours']:.1f} h" for k, v in e["stages"].items()), "", "Assumptions:"]
        lines += [f"- {a}" for a in e["assumptions"]]
    return "\n".join(lines) + "\n"
