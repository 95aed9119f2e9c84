"""``qlora-med plan``: per-component memory estimate and settings that fit a GPU."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from qlora_med.errors import QloraMedError
from qlora_med.plan.estimate import (
    GIB,
    GPUS,
    PRESETS,
    Choice,
    ModelShape,
    RunSpec,
    choose_settings,
    estimate_memory,
    parse_gpu,
    preset,
    step_flops,
)
from qlora_med.plan.recipe import _read_config, run_for_stage, shape_from_config_dict, shape_from_recipe

CPU_TFLOPS = 0.1  # assumed fp32 peak of a small CPU box for --cpu (2 AVX2 cores reach ~0.03 in matmuls)
NAME = "plan"
HELP = "estimate QLoRA training memory per component and pick batch/accumulation/checkpointing for a GPU"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", type=Path, help="recipe YAML: model shape, LoRA and stage settings")
    parser.add_argument("--model", help=f"preset ({', '.join(PRESETS)}) or a HF-format model directory "
                                        "(default: llava-med-v1.5 when no recipe is given)")
    parser.add_argument("--gpu", default="24GB", help=f"card memory (24GB) or a name: {', '.join(GPUS)}")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per run (data parallel)")
    parser.add_argument("--seq", type=int, help="max sequence length incl. image tokens (default 2048 or the recipe's)")
    parser.add_argument("--global-batch", type=int, help="samples per optimizer step, kept (default 128 or the recipe's)")
    parser.add_argument("--lora-rank", type=int, help=f"LoRA rank (default {RunSpec.lora_rank} or the recipe's)")
    parser.add_argument("--sharding", choices=("none", "zero2", "fsdp"), default="none",
                        help="none = DDP replicas; fsdp shards the 4-bit weights (see recipes/accelerate)")
    parser.add_argument("--ce", choices=("full", "chunked", "fused"), default="full",
                        help="loss: HF cross-entropy, chunked fp32 loss, or fused linear+CE (Liger)")
    parser.add_argument("--compute-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--cpu", action="store_true", help="plan a CPU run (fp32 compute, no CUDA context)")
    parser.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation for the time estimate")
    parser.add_argument("--tflops", type=float, help="peak dense 16-bit TFLOP/s per GPU (default: from --gpu)")
    parser.add_argument("--margin", type=float, default=0.10, help="fraction of the card kept free (fragmentation)")


def _model_shape(name: str) -> ModelShape:
    cfg = _read_config(name)
    if cfg is not None:
        return shape_from_config_dict(cfg, name=Path(name).name)
    try:
        return preset(name)
    except ValueError as err:
        raise QloraMedError(str(err)) from err


def _gib(x: float) -> str:
    return f"{x / GIB:7.2f}"


def _describe(shape: ModelShape) -> str:
    llm = shape.llm
    text = (f"LLM {(llm.linear_params + llm.unquantized_params) / 1e9:.2f}B ({llm.layers} x {llm.hidden}, "
            f"GQA {llm.heads}/{llm.kv_heads}, vocab {llm.vocab})")
    if shape.vision:
        v = shape.vision
        text += (f"; vision {v.params / 1e6:.0f}M ({v.layers} x {v.hidden} @{v.image_size}px/{v.patch_size}, "
                 f"{shape.image_tokens} image tokens); projector {shape.projector} {shape.projector_params / 1e6:.1f}M")
    return text


def _checkpointing(run: RunSpec, shape: ModelShape) -> str:
    k, total = run.checkpointed(shape.llm.layers), shape.llm.layers
    return "off" if k == 0 else "on" if k == total else f"on for the first {k} of {total} layers"


def _per_token(run: RunSpec, shape: ModelShape) -> str:
    k, total = run.checkpointed(shape.llm.layers), shape.llm.layers
    return "4N" if k == 0 else "6N" if k == total else f"{4 + 2 * k / total:.2g}N"


def print_choice(shape: ModelShape, choice: Choice, gpu_name: str, card_gib: float, tflops: float, mfu: float) -> None:
    run, est = choice.run, choice.estimate
    print(f"Model  {shape.name}: {_describe(shape)}")
    assumed = "" if gpu_name in GPUS else " (assumed: pass --tflops or a GPU name)"
    print(f"Card   {gpu_name}: {card_gib:g} GiB x {run.n_gpus} GPU(s), budget {choice.budget_bytes / GIB:.1f} GiB "
          f"per GPU, sharding {run.sharding}; peak {tflops:g} TFLOP/s{assumed}")
    text = run.seq_len - shape.image_tokens * run.images_per_sample
    print(f"\nChosen micro-batch {run.micro_batch} x grad-accum {choice.grad_accum} x {run.n_gpus} GPU(s) = global batch "
          f"{choice.global_batch}; max length {run.seq_len} ({shape.image_tokens * run.images_per_sample} image + "
          f"{text} text tokens)")
    print(f"       gradient checkpointing {_checkpointing(run, shape)}; optimizer {run.optimizer}; "
          f"LoRA r={run.lora_rank} on {','.join(run.lora_targets)}; {run.quantization} base, {run.compute_dtype} compute; "
          f"loss {run.ce}")
    for note in choice.notes:
        print(f"       note: {note}")
    print(f"\n{'component':44s} {'GiB':>7s}  {'when':13s} note")
    print("-" * 100)
    for c in est.components:
        when = "/".join(c.phases) if c.kind == "transient" else "always"
        print(f"{c.name:44s} {_gib(c.bytes)}  {when:13s} {c.note}")
    print("-" * 100)
    always = est.total("static") + est.total("grad") + est.total("context")
    print(f"{'always resident (weights, trainables, ctx)':44s} {_gib(always)}")
    for phase, size in est.phases.items():
        print(f"{'  + ' + phase + ' phase':44s} {_gib(size)}{'  <- peak' if phase == est.peak_phase else ''}")
    print(f"{'peak per GPU':44s} {_gib(est.peak_bytes)}  of {choice.budget_bytes / GIB:.2f} GiB budget")
    tokens = choice.global_batch * run.seq_len
    flops = step_flops(shape, run) * choice.grad_accum * run.n_gpus
    print(f"\nStep time ~ {choice.step_time_s:.3g} s per optimizer step ({tokens:,} tokens, {flops / 1e15:.1f} PFLOP; "
          f"{_per_token(run, shape)} per token for a frozen base"
          f"{' + recompute' if run.grad_checkpointing else ''}; {tflops:g} TFLOP/s x MFU {mfu:g}) "
          f"-> {tokens / choice.step_time_s:,.0f} tokens/s")


def main(args: argparse.Namespace) -> int:
    try:
        gpu = parse_gpu(args.gpu)
    except ValueError as err:
        raise QloraMedError(str(err)) from err
    device = "cpu" if args.cpu else "cuda"
    base = RunSpec(sharding=args.sharding, ce=args.ce, device=device,
                   compute_dtype="fp32" if args.cpu else args.compute_dtype)
    stages, seq, global_batch = [], 2048, 128
    if args.recipe is not None:
        from qlora_med.config.loader import load_recipe

        recipe = load_recipe(args.recipe, [])
        shape = _model_shape(args.model) if args.model else shape_from_recipe(recipe)
        stages = [(st.name, run_for_stage(recipe, st, args.gpus, device)) for st in recipe.stages]
        lead = next((run for _, run in stages if run.lora_rank), stages[0][1])
        base = replace(lead, sharding=args.sharding, ce=args.ce)
        seq, global_batch = lead.seq_len, lead.micro_batch * lead.grad_accum * args.gpus
    else:
        shape = _model_shape(args.model or "llava-med-v1.5")
    if args.lora_rank is not None:
        base = replace(base, lora_rank=args.lora_rank)
    seq, global_batch = args.seq or seq, args.global_batch or global_batch
    if global_batch % args.gpus:
        raise QloraMedError(f"global batch {global_batch} is not divisible by --gpus {args.gpus}")
    tflops = args.tflops or (CPU_TFLOPS if args.cpu else gpu.peak_tflops)
    choice = choose_settings(shape, gpu.memory_gib, args.gpus, global_batch, seq, base=base, margin=args.margin,
                             peak_tflops=tflops, mfu=args.mfu)
    if choice is None:
        smallest = replace(base, n_gpus=args.gpus, micro_batch=1, seq_len=seq, grad_checkpointing=True,
                           optimizer="paged_adamw_8bit", grad_accum=2)
        need = estimate_memory(shape, smallest).peak_bytes / GIB
        raise QloraMedError(f"{shape.name} does not fit {gpu.memory_gib:g} GiB even at micro-batch 1 with checkpointing "
                            f"and paged 8-bit AdamW (needs {need:.1f} GiB at {seq} tokens): use a bigger card, "
                            "--sharding fsdp with more GPUs, or --ce fused")
    print_choice(shape, choice, gpu.name, gpu.memory_gib, tflops, args.mfu)
    if stages:
        print(f"\nRecipe stages as configured ({args.recipe}):")
        from qlora_med.train.checkpointing import checkpointed_layers  # the runner's rule for auto

        settings = {st.name: st.gradient_checkpointing for st in recipe.stages}
        for name, run in stages:
            run = replace(run, sharding=args.sharding, ce=args.ce)
            auto = settings[name] == "auto"
            if auto:  # the fewest layers that fit this card
                off = replace(run, grad_checkpointing=False)
                k = checkpointed_layers(shape, off, gpu.memory_gib, args.margin)
                run = off.with_checkpointed(k, shape.llm.layers)
            est = estimate_memory(shape, run)
            fits = "fits" if est.peak_bytes <= choice.budget_bytes else "DOES NOT FIT"
            print(f"  {name:12s} micro-batch {run.micro_batch} x accum {run.grad_accum}, length {run.seq_len}, "
                  f"checkpointing {_checkpointing(run, shape)}{' (auto)' if auto else ''}, "
                  f"{run.optimizer}, LoRA r={run.lora_rank}: peak {est.peak_bytes / GIB:.1f} GiB ({fits})")
    return 0
