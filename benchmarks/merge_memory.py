"""Peak memory of ``qlora-med merge`` (streaming, shard by shard) vs model size, vs a load-everything merge.

Builds once (under --work) a LLaVA from config with a ~0.94 GB fp32 LLM (Mistral 1024 x 12 layers,
vocab 32064; CLIP 256 x 4) saved in 100 MB shards, plus a fake trained stage: a LoRA adapter
(r=16 on all 84 LLM linears, random A and B) and a projector. Each measurement runs in a fresh
subprocess and reads VmHWM (peak RSS) from /proc/self/status after the imports (baseline) and after
the merge; the table shows the difference. ``naive`` loads the whole model with ``from_pretrained``,
adds the deltas in memory and saves it: what a merge that is not streamed costs.

    python benchmarks/merge_memory.py            # prints a table, appends benchmarks/results/merge_memory.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "merge_memory.csv"
LAYERS, HIDDEN, FFN, RANK = 12, 1024, 3584, 16


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def build(work: Path) -> Path:
    """Base model dir + a fake stage output (adapter, projector, stage.json, processor) in ``work``."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    from qlora_med.artifacts.run_dir import (
        ADAPTER_CONFIG_FILE,
        ADAPTER_FILE,
        FINAL,
        PROJECTOR_FILE,
        STAGE_JSON,
    )
    from qlora_med.model.build import add_llava_tokens, make_processor, mistral_tokenizer

    base, final = work / "base", work / "run" / "instruct" / FINAL
    if (final / STAGE_JSON).is_file():
        return final
    tokenizer = mistral_tokenizer(base)
    add_llava_tokens(tokenizer, "<image>")
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=224, patch_size=14, projection_dim=256)
    text = MistralConfig(vocab_size=32064, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         vision_feature_select_strategy="default",
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(base, max_shard_size="100MB")
    processor = make_processor(tokenizer, 224, 14, "<image>")
    processor.save_pretrained(base)
    final.mkdir(parents=True)
    processor.save_pretrained(final)
    adapter = {}
    for name, module in model.named_modules():
        if name.startswith("model.language_model.layers.") and isinstance(module, torch.nn.Linear):
            prefix = f"base_model.model.{name}"
            adapter[f"{prefix}.lora_A.weight"] = torch.randn(RANK, module.in_features) * 0.01
            adapter[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, RANK) * 0.01
    save_file(adapter, final / ADAPTER_FILE)
    (final / ADAPTER_CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK}))
    save_file({k: v.contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()},
              final / PROJECTOR_FILE)
    (final / STAGE_JSON).write_text(json.dumps({
        "stage": "instruct", "kind": "instruct", "base_model": str(base.resolve()), "previous_stage": None,
        "template": "mistral_instruct", "quantization": "nf4", "compute_dtype": "float32", "image_aspect": "pad",
        "train": {"projector": "full", "llm": "lora"}, "lora": {"r": RANK, "alpha": 2 * RANK}, "steps": 0}))
    return final


def worker(mode: str, final: Path, out: Path, shard: str) -> dict:
    """One merge in this (fresh) process; returns peak RSS before/after."""
    import shutil

    import bitsandbytes  # noqa: F401 - everything the merge imports, before the baseline
    import torch
    from huggingface_hub import ModelCardData  # noqa: F401
    from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: F401

    from qlora_med.artifacts.merge import MergeOptions, merge

    shutil.rmtree(out, ignore_errors=True)
    baseline = _vm("VmHWM")
    start = time.time()
    if mode == "naive":
        from safetensors.torch import load_file
        from transformers import LlavaForConditionalGeneration

        info = json.loads((final / "stage.json").read_text())
        model = LlavaForConditionalGeneration.from_pretrained(info["base_model"], dtype=torch.float32)
        params = dict(model.named_parameters())
        adapter = load_file(final / "adapter_model.safetensors")
        with torch.no_grad():
            for key, a in adapter.items():
                if ".lora_A." in key:
                    b = adapter[key.replace("lora_A", "lora_B")]
                    params[key.removeprefix("base_model.model.").replace(".lora_A", "")].add_(2.0 * b @ a)
        model.save_pretrained(out, max_shard_size=shard)
    else:
        merge(final, out, MergeOptions(dtype="fp32", nf4_faithful=mode == "nf4-faithful", max_shard_size=shard))
    return {"baseline": baseline, "peak": _vm("VmHWM"), "seconds": time.time() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-med-merge-bench"))
    parser.add_argument("--csv", type=Path, default=RESULTS)
    parser.add_argument("_worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        mode, final, out, shard = args._worker
        sys.stdout.write(json.dumps(worker(mode, Path(final), Path(out), shard)) + "\n")
        return 0
    final = build(args.work)
    base = Path(json.loads((final / "stage.json").read_text())["base_model"])
    shards = sorted(base.glob("*.safetensors"))
    model_bytes, largest_in = sum(p.stat().st_size for p in shards), max(p.stat().st_size for p in shards)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for mode, shard in [("original", "100MB"), ("original", "1GB"), ("nf4-faithful", "100MB"), ("naive", "100MB")]:
        out = args.work / f"out-{mode}-{shard}"
        proc = subprocess.run([sys.executable, __file__, "--work", str(args.work), mode, str(final), str(out), shard],
                              capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            return 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"mode": mode, "out_shard": shard, "model_mb": round(model_bytes / 1e6),
                     "in_shard_mb": round(largest_in / 1e6), "baseline_mb": round(result["baseline"] / 1e6),
                     "peak_mb": round(result["peak"] / 1e6),
                     "merge_mb": round((result["peak"] - result["baseline"]) / 1e6),
                     "seconds": round(result["seconds"], 1)})
    head = f"{'mode':<13} {'out shard':>9} {'model':>8} {'in shard':>9} {'peak RSS':>9} {'- imports':>10} {'= merge':>8} {'time':>7}"
    lines = [f"merge peak memory (VmHWM), fp32 LLaVA, {len(shards)} input shards", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['mode']:<13} {r['out_shard']:>9} {r['model_mb']:>6}MB {r['in_shard_mb']:>7}MB "
                     f"{r['peak_mb']:>7}MB {r['baseline_mb']:>8}MB {r['merge_mb']:>6}MB {r['seconds']:>6}s")
    sys.stdout.write("\n".join(lines) + "\n")
    import torch
    import transformers

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new = not args.csv.is_file()
    with args.csv.open("a", newline="") as fh:
        extra = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cpu",
                 "torch": torch.__version__, "transformers": transformers.__version__}
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) + list(extra))
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**r, **extra})
    sys.stdout.write(f"appended to {args.csv}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
