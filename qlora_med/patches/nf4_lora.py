"""The fused NF4 + LoRA forward in every PEFT ``lora.Linear4bit`` (NF4 base) of one model instance.

Patches: each such module's instance ``forward`` (:func:`patch_nf4_lora`), calling
:func:`qlora_med.kernels.nf4_lora.nf4_lora_linear` with the backend it is given (``triton`` or ``torch``;
chosen by :func:`qlora_med.patches.select.resolve_nf4_lora`). Calls the fused path can't serve fall back to
PEFT's forward at call time. Undo: ``handle.undo()`` removes the instance forwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qlora_med.kernels.nf4_lora import NF4Weight, check_backend, nf4_lora_linear
from qlora_med.patches.handle import PatchHandle, set_instance_forward

logger = logging.getLogger(__name__)


def _lora4bit_class() -> type | None:
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes missing
        return None
    return Linear4bit


def _fusable(module: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """None if this call can take the fused path, else why not (checked on every call: cheap)."""
    if args or kwargs:
        return "extra forward arguments"
    if module.disable_adapters or module.merged:
        return "adapters disabled or merged"
    active = module.active_adapters
    if len(active) != 1 or active[0] not in module.lora_A:
        return "not exactly one active LoRA adapter"
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
        return "LoRA variant (e.g. DoRA)"
    if not isinstance(module.lora_A[name], nn.Linear) or not isinstance(module.lora_B[name], nn.Linear):
        return "LoRA layers are not nn.Linear"
    if module.lora_A[name].out_features > 256:
        return "LoRA rank above 256"
    if not isinstance(module.lora_dropout[name], (nn.Identity, nn.Dropout)):
        return "unsupported dropout module"
    qs = getattr(module.get_base_layer().weight, "quant_state", None)
    if qs is None or qs.quant_type != "nf4" or getattr(qs, "packing_format_for_cpu", False):
        return "weight is not NF4 in bitsandbytes' standard layout"
    return None


def _make_fused_forward(module: nn.Module, original: Callable, backend: str) -> Callable:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if _fusable(module, x, args, kwargs) is not None:
            return original(x, *args, **kwargs)
        name = module.active_adapters[0]
        base = module.get_base_layer()
        compute_dtype = base.compute_dtype or x.dtype
        xc = x.to(compute_dtype)
        dropout = module.lora_dropout[name]
        use_dropout = isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0
        y = nf4_lora_linear(
            xc,
            NF4Weight.from_bnb(base.weight),
            module.lora_A[name].weight,
            module.lora_B[name].weight,
            module.scaling[name],
            bias=base.bias,
            x_lora=dropout(xc) if use_dropout else None,
            backend=backend,
        )
        return y.to(x.dtype)

    return forward


def patch_nf4_lora(model: nn.Module, backend: str) -> PatchHandle:
    """Route every PEFT ``lora.Linear4bit`` (NF4 base) in ``model`` through the fused NF4 + LoRA function.

    Calls the fused path can't serve (disabled/merged/multiple adapters, DoRA, ``adapter_names``) fall
    back to PEFT's forward at call time. ``backend``: ``triton`` or ``torch`` (the PyTorch backend of the
    same autograd function).
    """
    handle = PatchHandle("fused NF4+LoRA forward")
    cls = _lora4bit_class()
    if cls is None:
        logger.warning("fused NF4+LoRA: peft/bitsandbytes 4-bit support missing; nothing patched")
        return handle
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    check_backend(backend, device)
    skipped = 0
    for name, module in model.named_modules():
        if not isinstance(module, cls):
            continue
        qs = getattr(module.get_base_layer().weight, "quant_state", None)
        if qs is None or qs.quant_type != "nf4":
            skipped += 1
            continue
        set_instance_forward(handle, name, module, _make_fused_forward(module, module.forward, backend))
    logger.info(
        "fused NF4+LoRA forward on %d modules (backend %s%s)%s",
        len(handle),
        backend,
        " under the Triton interpreter" if backend == "triton" and device.type != "cuda" else "",
        f"; {skipped} non-NF4 modules left as they were" if skipped else "",
    )
    return handle
