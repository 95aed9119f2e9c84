"""Swap fused kernels into one model instance, each patch undoable.

* :func:`patch_nf4_lora` - every PEFT ``lora.Linear4bit`` (NF4) runs the fused NF4 + LoRA function.
* :func:`chunked_causal_lm_loss` - the causal-LM loss from the backbone's hidden states and the LM
  head's weight with the chunked linear cross-entropy: the [tokens, vocab] logits never exist.
* :func:`patch_causal_lm_loss` - the same, behind the instance's own ``forward`` (for wrappers such as
  DDP that must see ``model(**inputs)``).

Only instance attributes are set (``module.forward``); classes and modules stay untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qlora_med.kernels.linear_ce import linear_cross_entropy
from qlora_med.kernels.nf4_lora import NF4Weight, nf4_lora_linear, resolve_backend

logger = logging.getLogger(__name__)

# Keys a trainer may put into a batch that the backbone's forward does not take.
NON_MODEL_KEYS = ("labels", "num_items_in_batch", "logits_to_keep", "completion_mask", "assistant_masks")
_MISSING = object()


@dataclass
class PatchHandle:
    """What a patch changed; :meth:`undo` restores it (idempotent). Usable as a context manager."""

    description: str
    targets: list[str] = field(default_factory=list)
    _restores: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def undo(self) -> None:
        while self._restores:
            self._restores.pop()()
        if self.targets:
            logger.info("undid %s on %d modules", self.description, len(self.targets))
        self.targets = []

    def __len__(self) -> int:
        return len(self.targets)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()


def set_instance_forward(handle: PatchHandle, name: str, module: nn.Module, forward: Callable) -> None:
    """Shadow ``module.forward`` with ``forward`` and record how to put the old one back."""
    previous = module.__dict__.get("forward", _MISSING)

    def restore() -> None:
        if previous is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = previous

    module.__dict__["forward"] = forward
    handle.targets.append(name)
    handle._restores.append(restore)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT / DDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        elif hasattr(model, "_orig_mod"):
            inner = model._orig_mod
        else:
            return model
        if inner is model:
            return model
        model = inner


# ----------------------------------------------------------------------------- NF4 + LoRA


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


def patch_nf4_lora(model: nn.Module, backend: str = "auto") -> PatchHandle:
    """Route every PEFT ``lora.Linear4bit`` (NF4 base) in ``model`` through the fused NF4 + LoRA function.

    Calls the fused path can't serve (disabled/merged/multiple adapters, DoRA, ``adapter_names``) fall
    back to PEFT's forward at call time. ``backend``: ``auto`` (Triton on CUDA, else the PyTorch
    fallback of the same autograd function), ``triton`` or ``torch``.
    """
    handle = PatchHandle("fused NF4+LoRA forward")
    cls = _lora4bit_class()
    if cls is None:
        logger.warning("fused NF4+LoRA: peft/bitsandbytes 4-bit support missing; nothing patched")
        return handle
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    resolved = resolve_backend(backend, device)
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
        resolved,
        " under the Triton interpreter" if resolved == "triton" and device.type != "cuda" else "",
        f"; {skipped} non-NF4 modules left as they were" if skipped else "",
    )
    return handle


# ----------------------------------------------------------------------------- chunked LM loss


def lm_backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """``(backbone, lm_head)`` of a causal LM / LLaVA: the backbone returns hidden states, not logits."""
    inner = unwrap_model(model)
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if backbone is None or backbone is inner or head is None:
        raise ValueError(f"{type(inner).__name__} has no backbone/LM head pair (base_model_prefix, lm_head)")
    if type(head) is not nn.Linear or not head.weight.is_floating_point():
        raise ValueError(
            f"chunked loss needs a plain, unquantized nn.Linear LM head, got {type(head).__name__}: keep "
            "lm_head out of quantization and LoRA (e.g. llm_int8_skip_modules=['lm_head'])"
        )
    config = getattr(inner, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            raise ValueError("chunked loss does not support logit softcapping / logit scaling")
    return backbone, head


def _loss_from_backbone(
    model: nn.Module,
    inputs: Mapping[str, Any],
    num_items_in_batch: int | torch.Tensor | None,
    chunk_size: int | None,
    backend: str,
) -> tuple[torch.Tensor, Any]:
    backbone, head = lm_backbone_and_head(model)
    labels = inputs["labels"]
    kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
    kwargs.setdefault("use_cache", False)
    outputs = backbone(**kwargs)
    hidden = outputs[0]
    # Position t predicts label t + 1 (as transformers' ForCausalLMLoss: pad, then shift).
    shifted = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)
    loss = linear_cross_entropy(
        hidden, head.weight, shifted, head.bias, ignore_index=-100, reduction="mean",
        num_items_in_batch=num_items_in_batch, chunk_size=chunk_size, backend=backend,
    )  # fmt: skip
    return loss, outputs


def chunked_causal_lm_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    num_items_in_batch: int | torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal-LM loss of ``model`` on ``inputs`` (a batch with ``labels``) without materialising logits.

    Same value as ``model(**inputs).loss`` (transformers' ``ForCausalLMLoss``): mean over labelled tokens,
    or sum / ``num_items_in_batch`` when given (gradient accumulation). Runs the backbone
    (``model.model`` for LLaVA: vision tower, projector and LLM) then :func:`linear_cross_entropy` with
    ``lm_head.weight``. Call it on the model the trainer holds (PEFT wrapper fine); under DDP use
    :func:`patch_causal_lm_loss` so the DDP wrapper's forward still runs.
    """
    return _loss_from_backbone(model, inputs, num_items_in_batch, chunk_size, backend)[0]


def patch_causal_lm_loss(
    model: nn.Module, *, chunk_size: int | None = None, backend: str = "auto"
) -> PatchHandle:
    """Make ``model(**inputs)`` with ``labels`` return the chunked loss and ``logits=None``.

    Calls without labels (generation, eval without labels) or with positional arguments run the
    original forward. Patches the unwrapped transformers model instance only.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    inner = unwrap_model(model)
    lm_backbone_and_head(inner)  # fail now, not at the first step
    original = inner.forward
    handle = PatchHandle("chunked linear-CE loss")

    def forward(*args: Any, **kwargs: Any) -> Any:
        if args or kwargs.get("labels") is None:
            return original(*args, **kwargs)
        nib = kwargs.pop("num_items_in_batch", None)
        loss, outputs = _loss_from_backbone(inner, kwargs, nib, chunk_size, backend)
        return CausalLMOutputWithPast(
            loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None)
        )

    set_instance_forward(handle, type(inner).__name__, inner, forward)
    logger.info("chunked linear-CE loss patched into %s.forward", type(inner).__name__)
    return handle
