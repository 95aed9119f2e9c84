"""``qlora-med plan``: per-component memory estimate and settings that fit a GPU."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

from qlora_med.errors import ConfigError, QloraMedError
from qlora_med.plan import (
    GIB,
    GPUS,
    LORA_TARGETS,
    PRESETS,
    Choice,
    LLMShape,
    ModelShape,
    RunSpec,
    VisionShape,
    choose_settings,
    estimate_memory,
    parse_gpu,
    preset,
    step_flops,
)

logger = logging.getLogger(__name__)
VISION_BY_NAME = {"clip-vit-large-patch14-336": PRESETS["llava-med-v1.5"].vision,
                  "clip-vit-large-patch14": VisionShape(24, 1024, 4096, 16, 224, 14)}
CPU_TFLOPS = 0.1  # assumed fp32 peak of a small CPU box for --cpu (2 AVX2 cores reach ~0.03 in matmuls)
NAME = "plan"
HELP = "estimate QLoRA training memory per component and pick batch/accumulation/checkpointing for a GPU"


def shape_from_config_dict(cfg: dict, name: str = "config") -> ModelShape:
    """ModelShape from a HF ``config.json`` dict: a LlavaConfig (text_config + vision_config) or a plain LLM."""
    text = cfg.get("text_config", cfg)
    heads = text["num_attention_heads"]
    llm = LLMShape(text["num_hidden_layers"], text["hidden_size"], text["intermediate_size"], heads,
                   text.get("num_key_value_heads") or heads, text["vocab_size"], text.get("head_dim"),
                   bool(text.get("tie_word_embeddings", False)))
    v = cfg.get("vision_config")
    if not v:
        return ModelShape(name, llm)
    vision = VisionShape(v["num_hidden_layers"], v["hidden_size"], v["intermediate_size"], v["num_attention_heads"],
                         v["image_size"], v["patch_size"])
    return ModelShape(name, llm, vision, "linear" if cfg.get("projector_type") == "linear" else "mlp2x_gelu")


def _read_config(path: str | None) -> dict | None:
    config = Path(path or "").expanduser() / "config.json"
    return json.loads(config.read_text()) if path and config.is_file() else None


def shape_from_recipe(recipe: object) -> ModelShape:
    """Model shape of a ``RecipeConfig``: the tiny builder's sizes, ``model.name_or_path``'s config.json,
    the compose-mode ``model.vision_tower`` + ``model.llm`` config.json files, or a preset name."""
    m = recipe.model  # type: ignore[attr-defined]
    if m.tiny is not None:  # qlora_med.model.build_tiny: CLIP MLP 4x hidden, vocab = tokenizer rounded up to 64
        t = m.tiny
        return ModelShape("tiny", LLMShape(t.text_layers, t.text_hidden, t.text_intermediate, t.text_heads,
                                           t.text_kv_heads, 32064),
                          VisionShape(t.vision_layers, t.vision_hidden, 4 * t.vision_hidden, t.vision_heads,
                                      t.image_size, t.patch_size))
    if m.name_or_path is not None:
        cfg = _read_config(m.name_or_path)
        if cfg is not None:
            return shape_from_config_dict(cfg, name=Path(m.name_or_path).name)
        try:
            return preset(m.name_or_path)
        except ValueError as err:
            raise ConfigError(f"model.name_or_path: no config.json in {m.name_or_path} and {err}") from None
    name = f"{Path(m.vision_tower).name} + {Path(m.llm).name}"
    vision, llm = _read_config(m.vision_tower), _read_config(m.llm)
    if vision is not None and llm is not None:
        cfg = {"text_config": llm, "vision_config": vision.get("vision_config", vision), "projector_type": m.projector_type}
        return shape_from_config_dict(cfg, name=name)
    try:  # not downloaded yet: known directory names
        shape = ModelShape(name, preset(Path(m.llm).name).llm, VISION_BY_NAME[Path(m.vision_tower).name.lower()],
                           m.projector_type)
    except (ValueError, KeyError):
        missing = m.vision_tower if vision is None else m.llm
        raise ConfigError(f"model: no config.json in {missing}; download the model first or plan with --model PRESET") from None
    logger.warning("model not downloaded: shape of %s taken from the directory names", name)
    return shape


def run_for_stage(recipe: object, stage: object, n_gpus: int = 1, device: str = "cuda") -> RunSpec:
    """RunSpec of one recipe stage as configured (batch, accumulation, length, optimizer, LoRA)."""
    lora, model, st = recipe.lora, recipe.model, stage  # type: ignore[attr-defined]
    optim = st.optim  # type: ignore[attr-defined]
    optimizer = ("paged_" if "paged" in optim else "") + ("adamw_8bit" if "8bit" in optim else "adamw")
    dtype = model.compute_dtype if model.compute_dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    targets = tuple(t.removesuffix("_proj") for t in lora.target_modules if t.removesuffix("_proj") in LORA_TARGETS)
    return RunSpec(
        micro_batch=st.per_device_batch_size, grad_accum=st.gradient_accumulation_steps, seq_len=st.max_length,
        lora_rank=lora.r if st.train.llm == "lora" else 0, lora_targets=targets, lora_dropout=lora.dropout,
        optimizer="paged_adamw_32bit" if optimizer == "paged_adamw" else optimizer,
        grad_checkpointing=st.gradient_checkpointing, compute_dtype=dtype, quantization=model.quantization,
        double_quant=model.double_quant, padded=not st.padding_free, device=device, n_gpus=n_gpus)


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
    print(f"       gradient checkpointing {'on' if run.grad_checkpointing else 'off'}; optimizer {run.optimizer}; "
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
          f"{'6N' if run.grad_checkpointing else '4N'} per token for a frozen base"
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
        from qlora_med.config import load_recipe

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
        for name, run in stages:
            est = estimate_memory(shape, replace(run, sharding=args.sharding, ce=args.ce))
            fits = "fits" if est.peak_bytes <= choice.budget_bytes else "DOES NOT FIT"
            print(f"  {name:12s} micro-batch {run.micro_batch} x accum {run.grad_accum}, length {run.seq_len}, "
                  f"checkpointing {'on' if run.grad_checkpointing else 'off'}, {run.optimizer}, LoRA r={run.lora_rank}: "
                  f"peak {est.peak_bytes / GIB:.1f} GiB ({fits})")
    return 0
