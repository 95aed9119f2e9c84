"""One-shot GPU validation: ``python benchmarks/gpu_check.py`` on one CUDA GPU, in about 8 minutes, no download.

1. ``pytest -m gpu`` (the Triton kernels against their references, ...): pass / fail / skip counts.
2. Builds a Mistral-7B-v0.2 + CLIP ViT-L/14-336 LLaVA from config (random weights, bf16, created on the meta device
   and materialised on the CPU, saved once as safetensors), the kit's own tokenizer and processor; the kit then
   loads it as ``qlora-med run`` does (NF4 + double quant on the fly, layer by layer: ~4.5 GiB on the GPU).
3. Real steps at the 24 / 16 / 12 GB recipes' settings (their micro-batch, LoRA r64, AdamW, checkpointing, seq 2048,
   gradients kept across 2 accumulated micro-batches as with their accumulation of 16-64), each under
   ``torch.cuda.set_per_process_memory_fraction`` emulating that card (its size less the CUDA context this process
   already holds): fits or not, measured ``max_memory_allocated`` / reserved against ``qlora-med plan``'s prediction
   (:func:`qlora_med.plan.estimate.estimate_memory`, loss modelled as full logits and as a fused head).
4. Kit vs the hand-written baseline (:mod:`qlora_med.bench.baseline`), each in its own process through the bench's
   workers, bf16, every sample filling 2048 tokens: tokens/s and peak GPU memory.
5. Extrapolates the 8xA100 curriculum's wall time from the measured step time (assumptions in the report).

Writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out``. ``--tiny --cpu`` runs the same logic on a tiny
LLaVA on the CPU (no card emulation, seq 128): ``tests/unit/bench/test_gpu_check.py`` runs it, so it cannot rot
before a GPU is there.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CARDS = {"24gb": 24.0, "16gb": 16.0, "12gb": 12.0}


@dataclass
class CheckSpec:
    tiny: bool = False
    cpu: bool = False
    seq: int = 2048
    warmup: int = 1
    steps: int = 2
    bench_batch: int = 4
    run_tests: bool = True
    in_process: bool = False
    budget_s: float = 480.0
    out: Path = Path("benchmarks/results/gpu_check")
    start: float = field(default_factory=time.time)

    def left(self) -> float:
        return self.budget_s - (time.time() - self.start)


# ----------------------------------------------------------------------------- model


def llava_config(tiny: bool, tokenizer, image_token: str = "<image>"):
    """Mistral-7B-v0.2 + CLIP ViT-L/14-336 (LLaVA-Med v1.5's shapes), or a tiny one of the same layout."""
    from transformers import CLIPVisionConfig, LlavaConfig, MistralConfig

    vocab = (len(tokenizer) + 63) // 64 * 64
    if tiny:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=56, patch_size=14, projection_dim=32)  # fmt: skip
        text = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2)  # fmt: skip
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
        text = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, rope_theta=1e6, rms_norm_eps=1e-5)  # fmt: skip
    text.update({"vocab_size": vocab, "max_position_embeddings": 32768, "sliding_window": None,
                 "tie_word_embeddings": False, "bos_token_id": tokenizer.bos_token_id,
                 "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})  # fmt: skip
    return LlavaConfig(vision_config=vision, text_config=text, projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default",
                       image_token_index=tokenizer.convert_tokens_to_ids(image_token))  # fmt: skip


def build_model_dir(out: Path, tiny: bool) -> dict:
    """Random-weight LLaVA saved in HF format under ``out`` (bf16; fp32 for tiny): meta device, then materialised."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from qlora_med.model.processor import add_llava_tokens, make_processor, mistral_tokenizer

    start = time.time()
    tokenizer = mistral_tokenizer(out)
    add_llava_tokens(tokenizer, "<image>")
    config = llava_config(tiny, tokenizer)
    dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config).to(dtype)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    block = torch.randn(1 << 24, generator=gen).mul_(0.02).to(dtype)  # 16M random values, tiled into big weights
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name:
                param.fill_(1.0)
            elif tiny:
                param.normal_(0.0, 0.02, generator=gen)
            else:
                flat = param.view(-1)
                for offset in range(0, flat.numel(), block.numel()):
                    n = min(block.numel(), flat.numel() - offset)
                    flat[offset : offset + n].copy_(block[:n])
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, max_shard_size="4GB")
    vision = config.vision_config
    make_processor(tokenizer, vision.image_size, vision.patch_size, "<image>").save_pretrained(out)
    del model
    gc.collect()
    return {"path": str(out), "params": params, "build_s": round(time.time() - start, 1), "dtype": str(dtype)}


# ----------------------------------------------------------------------------- pytest -m gpu


def parse_pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line ('3 passed, 2 skipped, 1 deselected in 4.2s')."""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "deselected", "xfailed")}
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)]
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed)", lines[-1] if lines else ""):
        counts["error" if word.startswith("error") else word] += int(number)
    return counts


def run_pytest(timeout: float) -> dict:
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
    except subprocess.TimeoutExpired as err:
        return {"rc": None, "timed_out": True, "seconds": round(time.time() - start, 1),
                "tail": (err.stdout or b"")[-2000:].decode(errors="replace") if isinstance(err.stdout, bytes)
                else str(err.stdout or "")[-2000:]}  # fmt: skip
    return {"rc": proc.returncode, "timed_out": False, "seconds": round(time.time() - start, 1),
            **parse_pytest_summary(proc.stdout), "tail": proc.stdout[-2000:]}  # fmt: skip


# ----------------------------------------------------------------------------- recipe steps under a card's memory


def synthetic_batch(micro: int, seq: int, config, gen) -> dict:
    """``micro`` samples of exactly ``seq`` tokens: BOS, the image tokens, text; every text token labelled."""
    import torch

    n_img = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    vocab = config.text_config.vocab_size
    ids = torch.randint(100, min(vocab, 32000), (micro, seq), generator=gen)
    ids[:, 0] = config.text_config.bos_token_id
    ids[:, 1 : 1 + n_img] = config.image_token_index
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100
    size = config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(micro, 3, size, size, generator=gen)}  # fmt: skip


def _card_fraction(card_gib: float, context_bytes: int) -> float:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    return min(1.0, max(0.01, (card_gib * 2**30 - context_bytes) / total))


def recipe_checks(model_dir: Path, spec: CheckSpec) -> list[dict]:
    """Train a few steps at each consumer recipe's settings (one loaded model), under that card's memory on CUDA."""
    import datasets
    import torch
    from transformers import TrainerCallback

    from qlora_med.bench.meter import StepMeter
    from qlora_med.config.loader import load_recipe
    from qlora_med.config.schema import ModelConfig
    from qlora_med.model.load import load_model, resolve_compute_dtype
    from qlora_med.patches.select import apply_kernels
    from qlora_med.plan.estimate import GIB, estimate_memory
    from qlora_med.plan.recipe import run_for_stage, shape_from_config_dict
    from qlora_med.train.checkpointing import checkpointed_layers, enable_checkpointing
    from qlora_med.train.trainable import setup_trainable
    from qlora_med.train.trainer import StageTrainer, sft_config

    cuda = torch.cuda.is_available()
    recipes = {n: load_recipe(ROOT / "recipes" / f"llava_med_v15_{n}.yaml") for n in CARDS}
    first = next(iter(recipes.values()))
    dtype = resolve_compute_dtype("bf16" if cuda else "auto")
    context = 0
    if cuda:
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        context = total - free - torch.cuda.memory_reserved()
    model, processor = load_model(ModelConfig(name_or_path=str(model_dir)), model_dir, dtype)
    model = setup_trainable(model, first.stage("instruct").train, first.lora, None, True)
    kernels = apply_kernels(model, first.kernels, False)
    shape = shape_from_config_dict(json.loads((model_dir / "config.json").read_text()))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, recipe in recipes.items():
        if spec.left() < 60:
            rows.append({"recipe": name, "skipped": "time budget"})
            continue
        stage = recipe.stage("instruct")
        micro = int(stage.per_device_batch_size)
        run_stage = dataclasses.replace(
            stage, max_length=spec.seq, per_device_batch_size=micro, gradient_accumulation_steps=2,
            global_batch_size=None, max_steps=spec.warmup + spec.steps, logging_steps=1, save_steps=10**6,
            warmup_ratio=0.0, dataloader_workers=0, padding_free=False,
        )  # fmt: skip
        run = run_for_stage(recipe, run_stage, 1, "cuda")
        layers = shape.llm.layers if stage.gradient_checkpointing is True else 0
        if stage.gradient_checkpointing == "auto":  # the kit's auto rule against the emulated card
            layers = checkpointed_layers(shape, run, CARDS[name])
        run = run.with_checkpointed(layers, shape.llm.layers)
        plan = {ce: estimate_memory(shape, dataclasses.replace(run, ce=ce)) for ce in ("full", "fused")}
        if layers:
            enable_checkpointing(model, layers)
        else:
            model.activation_checkpointing_disable()
        batches = [synthetic_batch(micro, spec.seq, model.config, gen) for _ in range(2 * (spec.warmup + spec.steps))]
        meter = StepMeter(spec.warmup)

        class Timer(TrainerCallback):
            def __init__(self, meter: StepMeter) -> None:
                self.meter = meter

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
                self.meter.step_done(state.global_step)

        row = {"recipe": name, "card_gib": CARDS[name], "micro_batch": micro, "accumulation": 2, "seq": spec.seq,
               "checkpointed_layers": layers, "optimizer": stage.optim, "lora_r": recipe.lora.r,
               "plan_alloc_gib_full_ce": plan["full"].allocated_peak_bytes / GIB,
               "plan_alloc_gib_fused_ce": plan["fused"].allocated_peak_bytes / GIB,
               "plan_peak_gib_full_ce": plan["full"].peak_bytes / GIB, "loss_path": kernels.loss}  # fmt: skip
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(_card_fraction(CARDS[name], context))
            torch.cuda.reset_peak_memory_stats()
        trainer = None
        with tempfile.TemporaryDirectory() as tmp:
            args = sft_config(run_stage, Path(tmp), 0, dtype, "none")
            args.per_device_train_batch_size = 1  # one item = one prepared micro-batch
            args.train_sampling_strategy = "sequential"
            args.disable_tqdm = True
            try:
                trainer = StageTrainer(
                    model=model, args=args, data_collator=lambda f, batches=batches: dict(batches[f[0]["index"]]),
                    train_dataset=datasets.Dataset.from_dict({"index": list(range(len(batches)))}),
                    processing_class=processor, projector_lr=stage.projector_lr, save_total_limit=1,
                    loss_mode=kernels.loss, callbacks=[Timer(meter)],
                )  # fmt: skip
                trainer.train()
                times = sorted(meter.result()["step_seconds"])
                step_s = times[len(times) // 2]  # median optimizer step (2 micro-batches)
                row.update(fits=True, step_s=step_s, tokens_per_s=2 * micro * spec.seq / max(step_s, 1e-9),
                           loss_first=trainer.state.log_history[0].get("loss"))  # fmt: skip
            except torch.OutOfMemoryError as err:
                row.update(fits=False, error=str(err).splitlines()[0][:300])
            finally:
                if trainer is not None:  # drop the optimizer states before the next card
                    trainer.accelerator.free_memory()
                    trainer.optimizer = trainer.lr_scheduler = None
                del trainer
                model.zero_grad(set_to_none=True)
                if cuda:
                    gc.collect()
        if cuda:
            row.update(measured_alloc_gib=torch.cuda.max_memory_allocated() / GIB,
                       measured_reserved_gib=torch.cuda.max_memory_reserved() / GIB, context_gib=context / GIB)  # fmt: skip
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0)
        else:
            row.update(measured_peak_rss_gib=meter.result()["peak_rss_mib"] / 1024)
        rows.append(row)
        logger.info("recipe %s: %s", name, {k: v for k, v in row.items() if k != "error"})
    del model
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- kit vs baseline at seq 2048


def kit_vs_baseline(model_dir: Path, spec: CheckSpec) -> dict:
    """The bench's kit and baseline workers on samples that fill ``spec.seq`` tokens (bf16 on CUDA)."""
    from transformers import AutoProcessor

    from qlora_med.bench.suite import VARIANTS, run_in_process, run_worker
    from qlora_med.bench.workloads import fixed_length_records, write_workload
    from qlora_med.config.loader import load_recipe
    from qlora_med.model.load import resolve_compute_dtype

    processor = AutoProcessor.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    vision = config["vision_config"]
    n_img = (vision["image_size"] // vision["patch_size"]) ** 2
    lora = load_recipe(ROOT / "recipes" / "llava_med_v15_24gb.yaml").lora
    runner = run_in_process if spec.in_process else run_worker
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_workload(Path(tmp) / "workload", processor.tokenizer, 1, 0)
        images = sorted(p.name for p in paths["images"].iterdir())
        records = fixed_length_records(processor.tokenizer, spec.bench_batch * (spec.warmup + spec.steps),
                                       spec.seq - n_img + 32, images)  # fmt: skip
        path = Path(tmp) / "fixed.json"
        path.write_text(json.dumps(records))
        dtype = str(resolve_compute_dtype("auto")).removeprefix("torch.")
        for name in ("kit", "baseline"):
            if spec.left() < 90:
                out[name] = {"skipped": "time budget"}
                continue
            variant = next(v for v in VARIANTS if v.name == name)
            payload = {"model_dir": str(model_dir), "records": str(path), "images": str(paths["images"]),
                       "mix": "instruct", "batch_size": spec.bench_batch, "steps": spec.steps, "warmup": spec.warmup,
                       "max_length": spec.seq, "dtype": dtype, "seed": 0, "gradient_checkpointing": True,
                       "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout},
                       "variant": dataclasses.asdict(variant)}  # fmt: skip
            data = runner(variant.script, payload, None, Path(tmp))
            measured = data["batches"][-len(data["step_seconds"]) :]
            tokens = sum(sum(b["lengths"]) for b in measured)
            out[name] = {"tokens_per_s": tokens / data["seconds"], "seconds": data["seconds"],
                         "step_s": data["step_seconds"], "loss_first": data["losses"][0],
                         "peak_gpu_alloc_gib": data.get("cuda_peak_allocated_mib", float("nan")) / 1024,
                         "peak_gpu_reserved_gib": data.get("cuda_peak_reserved_mib", float("nan")) / 1024,
                         "peak_rss_gib": data["peak_rss_mib"] / 1024, "mean_length": tokens / max(1, sum(
                             len(b["lengths"]) for b in measured))}  # fmt: skip
    return out


def run_check(spec: CheckSpec) -> dict:
    import torch

    from qlora_med.bench.gpu_report import extrapolate, to_markdown
    from qlora_med.bench.meter import matmul_peak

    cuda = torch.cuda.is_available()
    report: dict = {"device": torch.cuda.get_device_name() if cuda else "CPU", "cuda": cuda,
                    "when": time.strftime("%Y-%m-%d %H:%M:%S"), "spec": {**dataclasses.asdict(spec), "out": str(spec.out)}}  # fmt: skip
    spec.out.mkdir(parents=True, exist_ok=True)
    if spec.run_tests:
        report["pytest"] = run_pytest(timeout=max(30.0, min(180.0, spec.left() - 300)))
    peak = matmul_peak("bfloat16" if cuda else "float32", size=None if not spec.tiny else 256,
                       seconds=1.0 if not spec.tiny else 0.05)  # fmt: skip
    report["matmul_peak"] = peak
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        model_dir = Path(tmp) / "llava-7b-random"
        report["model"] = build_model_dir(model_dir, spec.tiny)
        report["recipes"] = recipe_checks(model_dir, spec)
        report["bench"] = kit_vs_baseline(model_dir, spec)
        config = json.loads((model_dir / "config.json").read_text())
    n_img = (config["vision_config"]["image_size"] // config["vision_config"]["patch_size"]) ** 2
    report["extrapolation"] = extrapolate(report["recipes"], report["bench"], peak["flops"] / 1e12, n_img)
    report["wall_s"] = round(time.time() - spec.start, 1)
    (spec.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (spec.out / "gpu_check.md").write_text(to_markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny LLaVA instead of 7B (logic check)")
    parser.add_argument("--cpu", action="store_true", help="hide CUDA (CUDA_VISIBLE_DEVICES='')")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    parser.add_argument("--in-process", action="store_true", help="run the bench workers in this process (tests)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample (default 2048; 128 with --tiny)")
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps per check (default 2)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip later checks past this (default 480)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check")
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    spec = CheckSpec(tiny=args.tiny, cpu=args.cpu, seq=args.seq or (128 if args.tiny else 2048), steps=args.steps,
                     run_tests=not args.skip_tests, in_process=args.in_process, budget_s=args.budget_s,
                     out=args.out, bench_batch=2 if args.tiny else 4)  # fmt: skip
    report = run_check(spec)
    from qlora_med.bench.gpu_report import to_markdown

    print(to_markdown(report))
    print(f"wrote {spec.out / 'gpu_check.json'} and {spec.out / 'gpu_check.md'} ({report['wall_s']} s)")
    return 0
