"""``qlora-med export``: PEFT adapter, original LLaVA-Med layout, or GGUF (+ mmproj) for llama.cpp."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora_med.commands._options import DTYPE_CHOICES, EXPORT_FORMATS, human_size

NAME = "export"
HELP = "export a trained run as a PEFT adapter, a merged HF checkpoint, a LLaVA-Med v1.5 checkpoint or GGUF files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="run dir, final/, checkpoint-N/, merged dir, or (for hf) a llava-med export")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="peft: adapter + connector; hf: a merged transformers checkpoint (any family; a "
                        "llava-med export back to HF LLaVA); llava-med: original LLaVA-Med layout (LLaVA 1.5); "
                        "gguf: llama.cpp LLM + mmproj (LLaVA 1.5)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES,
                        help="weights dtype when merging (llava-med, gguf: f32/f16/bf16 tensors; default f16 for gguf)")
    parser.add_argument("--nf4-faithful", action="store_true", help="merge onto the NF4-round-tripped base (see merge)")
    parser.add_argument("--base-model-id", help="peft: base model written to adapter_config.json (e.g. a Hub id)")
    parser.add_argument("--vision-tower-name",
                        help="llava-med: mm_vision_tower (e.g. openai/clip-vit-large-patch14-336); default: a "
                        "vision_tower/ folder written next to the weights")
    parser.add_argument("--max-shard-size", default="2GB", help="safetensors shard size")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def main(args: argparse.Namespace) -> int:
    from qlora_med.artifacts.export import ExportOptions, export

    options = ExportOptions(format=args.format, dtype=args.dtype, nf4_faithful=args.nf4_faithful,
                            base_model_id=args.base_model_id, vision_tower_name=args.vision_tower_name,
                            max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    files = export(args.source, args.out, options)
    width = max(len(str(f.relative_to(args.out))) for f in files)
    lines = [f"exported {args.source} as {args.format} to {args.out}"]
    lines += [f"  {str(f.relative_to(args.out)):<{width}}  {human_size(f.stat().st_size):>10}" for f in files]
    lines.append(f"  {'total':<{width}}  {human_size(sum(f.stat().st_size for f in files)):>10}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
