"""``qlora-med merge``: adapter + projector merged into a full-precision HF LLaVA checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora_med.commands._options import DTYPE_CHOICES

NAME = "merge"
HELP = "merge a trained run's LoRA adapters and projector into a full-precision HF LLaVA checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="run dir, a stage's final/ or a checkpoint-N/ dir")
    parser.add_argument("--out", type=Path, required=True, help="output directory (HF LLaVA format)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="output dtype (default: the base checkpoint's)")
    parser.add_argument(
        "--nf4-faithful", action="store_true",
        help="merge onto the NF4-round-tripped base weights the adapter was trained against: reproduces the "
        "trained model's outputs (default: the original full-precision base weights)",
    )
    parser.add_argument("--max-shard-size", default="2GB",
                        help="output shard size, e.g. 2GB or 500MB; peak memory is about one input plus one output shard")
    parser.add_argument("--base", help="HF LLaVA dir of the base model, if it moved since training (default: "
                        "stage.json's base_model)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def main(args: argparse.Namespace) -> int:
    from qlora_med.artifacts.merge import MergeOptions, merge

    options = MergeOptions(dtype=args.dtype, nf4_faithful=args.nf4_faithful, max_shard_size=args.max_shard_size,
                           overwrite=args.overwrite, base_model=args.base)
    r = merge(args.source, args.out, options)
    sys.stdout.write(
        f"merged {r.source} -> {r.out}\n"
        f"  base weights      {r.mode}\n"
        f"  dtype             {r.dtype}\n"
        f"  shards            {len(r.shards)} ({r.total_bytes / 1e6:.1f} MB)\n"
        f"  LoRA layers       {r.merged_layers} (mean |s*B@A| / |W| = {r.delta_rel_norm:.4f})\n"
        f"  NF4 round-trips   {r.nf4_layers}\n"
        f"  stages            {', '.join(s['stage'] for s in r.stages)}\n"
        f"  time              {r.seconds:.1f} s\n"
    )
    return 0
