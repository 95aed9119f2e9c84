"""Resolve a recipe's ``kernels:`` (and a stage's ``padding_free``) for this device and apply them to the model.

What ``auto`` means, and why (measured on a 2-core CPU, AVX2, fp32 compute; ``qlora-med bench``):

* ``liger``: on with CUDA; off on CPU (Triton cannot compile there).
* ``nf4_lora``: on everywhere. CUDA: the Triton kernel (not yet benchmarked on a GPU). CPU: the same autograd
  function with bitsandbytes' dequantize + torch matmul: speed level with PEFT's ``Linear4bit`` (MLP block
  microbenchmark 3-12% faster; in ``qlora-med bench`` 0.94-1.18x, within run-to-run noise) and PEFT's path
  needs 1.3-1.6x the kit's peak training memory there, so it is on by default on CPU too.
* ``loss``: ``chunked`` on CPU: only labelled tokens reach the LM head and the [tokens, vocab] logits never
  exist (bench: 1.3x the throughput of full logits at 0.46x the memory). TRL's fused head scores every position
  off-GPU, image and prompt tokens included: 0.53x the chunked throughput at 3.5x the memory on CPU. ``trl`` on
  CUDA: its Triton path scores labelled tokens only and keeps the entropy / token-accuracy metrics.
* ``chunk_size`` (chunked loss, PyTorch backend): rows for ~64 MiB of fp32 logits per chunk (523 rows at a
  32k vocabulary). Against the kernel's 256 MiB default: 2% slower at 1,500 labelled rows x H 512, and ~100 MiB
  (10%) less peak training memory for the kit in ``qlora-med bench``.

Apply after ``setup_trainable`` (adapters exist) and before the trainer is built (TRL wraps the patched
forward with its own fused head).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from qlora_med.config.schema import KernelsConfig
from qlora_med.kernels.nf4_lora import resolve_backend
from qlora_med.patches.chunked_loss import patch_causal_lm_loss
from qlora_med.patches.handle import PatchHandle, unwrap_model
from qlora_med.patches.liger import apply_liger_kernels
from qlora_med.patches.nf4_lora import patch_nf4_lora
from qlora_med.patches.padding_free import enable_padding_free

logger = logging.getLogger(__name__)

LOSS_WITHOUT_METRICS = ("chunked",)
CHUNK_BYTES = 64 * 2**20


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def resolve_loss(mode: str, device: torch.device) -> str:
    """``auto`` -> ``chunked`` on CPU, ``trl`` on CUDA; other modes as given."""
    if mode == "auto":
        return "trl" if device.type == "cuda" else "chunked"
    return mode


def resolve_nf4_lora(mode: str, device: torch.device) -> str | None:
    """Backend of the fused NF4+LoRA function (``triton`` on CUDA, ``torch`` on CPU), or None when off."""
    if mode == "off":
        return None
    return resolve_backend("auto", device)


def default_chunk_rows(model: nn.Module) -> int:
    """Rows per chunk of the chunked loss so that one fp32 [rows, vocab] block is ~:data:`CHUNK_BYTES`."""
    head = unwrap_model(model).get_output_embeddings()
    return max(64, CHUNK_BYTES // (4 * head.weight.shape[0]))


@dataclass
class KernelSetup:
    """The resolved choices and the patches that implement them (``undo()`` restores the model)."""

    liger: bool
    nf4_lora: str | None
    nf4_lora_modules: int
    loss: str
    padding_free: bool
    chunk_size: int | None = None
    handles: list[PatchHandle] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, object]:
        """Plain data for ``stage.json``."""
        return {
            "liger": self.liger,
            "nf4_lora": self.nf4_lora or "off",
            "nf4_lora_modules": self.nf4_lora_modules,
            "loss": self.loss,
            "padding_free": self.padding_free,
            "chunk_size": self.chunk_size,
        }

    def undo(self) -> None:
        while self.handles:
            self.handles.pop().undo()


def apply_kernels(model: nn.Module, cfg: KernelsConfig, padding_free: bool = False) -> KernelSetup:
    """Apply Liger, the fused NF4+LoRA forward, the loss path and padding-free attention to ``model``; logs one
    line saying which path runs. Returns the setup; the trainer reads ``setup.loss``."""
    device = model_device(model)
    handles: list[PatchHandle] = []
    liger = apply_liger_kernels(model, cfg.liger)
    handles.append(liger)
    backend = resolve_nf4_lora(cfg.nf4_lora, device)
    n_fused = 0
    if backend is not None:
        fused = patch_nf4_lora(model, backend=backend)
        handles.append(fused)
        n_fused = len(fused)
    loss = resolve_loss(cfg.loss, device)
    chunk = None
    if loss == "chunked":
        chunk = cfg.chunk_size or default_chunk_rows(model)
        handles.append(patch_causal_lm_loss(model, chunk_size=chunk))
    if padding_free:
        handles.append(enable_padding_free(model))
    setup = KernelSetup(bool(len(liger)), backend, n_fused, loss, padding_free, chunk, handles)
    logger.info(
        "kernels: liger %s | fused NF4+LoRA %s | loss %s%s%s | padding-free %s",
        "on" if setup.liger else f"off ({cfg.liger})",
        f"{backend} backend on {n_fused} layers" if backend else "off (PEFT Linear4bit)",
        loss,
        {"auto": " (auto)"}.get(cfg.loss, ""),
        f", {chunk} rows per chunk" if chunk else "",
        "on" if padding_free else "off",
    )
    if loss in LOSS_WITHOUT_METRICS:
        logger.info(
            "loss %s: TRL's entropy and mean_token_accuracy metrics are not computed (no logits); "
            "set kernels.loss=trl to keep them",
            loss,
        )
    return setup
