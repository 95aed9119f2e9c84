"""Merge a trained stage (LoRA adapter + projector) into a full-precision HF LLaVA checkpoint.

The merge math, for every adapted linear layer with frozen base weight ``W`` (d_out x d_in), LoRA
factors ``A`` (r x d_in) and ``B`` (d_out x r), and scale ``s = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA)::

    W_merged = W_base + s * (B @ A)        # in fp32, then cast to the output dtype

``W_base`` is one of:

* ``original`` (default): the base checkpoint's full-precision ``W``. The trained model computed
  ``x @ W_nf4.T + s * (x @ A.T) @ B.T`` with ``W_nf4 = dequant(quant_nf4(W))``; the merged model
  differs from it by ``x @ (W - W_nf4).T``, the NF4 rounding error the adapter was trained around.
  This is the usual "merge into the bf16 base" deployment; the error is measured in the tests.
* ``nf4_faithful``: ``W_nf4`` itself (bitsandbytes blockwise NF4 quantize + dequantize of
  ``W.to(compute_dtype)``, bitsandbytes' default blocksize and the recipe's double-quant, as
  ``from_pretrained(quantization_config=...)`` did in training), applied to *every* NF4-quantized
  layer, adapted or not. The merged model then reproduces the evaluated adapter model up to float
  rounding, at the cost of keeping the 4-bit rounding of the base in 16-bit weights.

Everything else (embeddings, norms, lm_head, vision tower) is copied; the projector is replaced by
the trained ``projector.safetensors``. The merge streams: one input shard is read (``safe_open``),
transformed tensor by tensor into an output buffer that is written whenever it reaches
``max_shard_size`` (2 GB by default), so peak memory is about one input shard plus one output shard
(``benchmarks/merge_memory.py`` measures it). Keys keep the base checkpoint's on-disk names.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from qlora_med.errors import QloraMedError

logger = logging.getLogger(__name__)
_PREFIXES = [
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\."), "model.language_model."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
]


def canonical_key(key: str) -> str:
    """A checkpoint key in transformers 5's in-memory LLaVA naming (what PEFT module names use).

    Accepts the on-disk layouts of transformers 4 and 5 (``language_model.model.*``,
    ``language_model.lm_head.*``, ``vision_tower.[vision_model.]*``, ``multi_modal_projector.*``)
    and the in-memory one (``model.language_model.*``, ``lm_head.*``).
    """
    for pattern, repl in _PREFIXES:
        if pattern.match(key):
            key = pattern.sub(repl, key, count=1)
            break
    return key.replace("model.vision_tower.vision_model.", "model.vision_tower.", 1)


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"64KB"`` or bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, flags=re.I)
    if not match:
        raise QloraMedError(f"max shard size '{size}': use e.g. 5GB, 500MB or a byte count")
    unit = (match.group(2) or "B").upper().replace("I", "")
    return int(float(match.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit])


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of an HF checkpoint, in index order."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [model_dir / name for name in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise QloraMedError(f"{model_dir}: no model.safetensors(.index.json); the base must be saved as safetensors")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ShardWriter:
    """Collect tensors and write ``model-XXXXX-of-YYYYY.safetensors`` shards plus the index."""

    def __init__(self, out: Path, max_bytes: int, prefix: str = "model") -> None:
        self.out, self.max_bytes, self.prefix = out, max_bytes, prefix
        self.tensors: dict[str, torch.Tensor] = {}
        self.size = 0
        self.total = 0
        self.files: list[tuple[Path, list[str]]] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.tensors and self.size + nbytes > self.max_bytes:
            self.flush()
        self.tensors[key] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.tensors:
            return
        path = self.out / f".{self.prefix}-part{len(self.files):05d}.safetensors"
        save_file(self.tensors, path, metadata={"format": "pt"})
        self.files.append((path, list(self.tensors)))
        self.tensors, self.size = {}, 0

    def finish(self) -> list[str]:
        """Rename the parts, write the index (when sharded); return the shard file names."""
        self.flush()
        n = len(self.files)
        names = [f"{self.prefix}.safetensors"] if n == 1 else [
            f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        mode = 0o666 & ~_umask()  # safetensors writes private (0600) files
        for (path, keys), name in zip(self.files, names, strict=True):
            path.rename(self.out / name)
            os.chmod(self.out / name, mode)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))  # inside an atomic_dir
        return names
