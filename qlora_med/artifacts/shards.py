"""Safetensors shards of an HF checkpoint: key naming across on-disk layouts, reading the shard list, writing shards.

:func:`canonical_key` maps any on-disk key of a supported family (transformers 4 or 5) to the in-memory name PEFT
uses;
:func:`weight_files` lists a checkpoint's shards in index order; :class:`ShardWriter` writes
``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_bytes`` (:func:`parse_size`) plus the index.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from qlora_med.errors import QloraMedError

_PREFIXES = [
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\."), "model.language_model."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
    (re.compile(r"^image_newline$"), "model.image_newline"),  # LLaVA-NeXT
    (re.compile(r"^visual\."), "model.visual."),  # Qwen2-VL / Qwen2.5-VL: the tower and its merger
    (re.compile(r"^model\.(embed_tokens|layers|norm)\."), r"model.language_model.\1."),  # Qwen's decoder
]


def canonical_key(key: str) -> str:
    """A checkpoint key in transformers 5's in-memory naming (what PEFT module names and the family table use).

    Accepts the on-disk layouts transformers 4 and 5 write: LLaVA / LLaVA-NeXT / Gemma 3 (``language_model.model.*``,
    ``language_model.lm_head.*``, ``vision_tower.[vision_model.]*``, ``multi_modal_projector.*``, ``image_newline``),
    Qwen2(.5)-VL (``model.layers.*``, ``model.embed_tokens.*``, ``model.norm.*``, ``visual.*``), and the in-memory
    one (``model.language_model.*``, ``model.visual.*``, ``lm_head.*``).
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
