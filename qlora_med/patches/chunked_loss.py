"""The causal-LM loss from hidden states and the LM head's weight: the [tokens, vocab] logits never exist.

* :func:`chunked_causal_lm_loss` - the loss of a batch with ``labels``: the backbone's hidden states, then
  :func:`qlora_med.kernels.linear_ce.linear_cross_entropy` with ``lm_head.weight``;
* :func:`patch_causal_lm_loss` - the same behind the instance's own ``forward`` (so wrappers such as DDP still
  see ``model(**inputs)``); it returns ``logits=None``. Undo: ``handle.undo()`` removes the instance forward.

Both take the linear-CE backend (``torch`` or ``liger``) and chunk size as given; what a recipe's ``auto``
means is decided in :mod:`qlora_med.patches.select`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qlora_med.kernels.linear_ce import linear_cross_entropy
from qlora_med.patches.handle import PatchHandle, set_instance_forward, unwrap_model

logger = logging.getLogger(__name__)

# Keys a trainer may put into a batch that the backbone's forward does not take.
NON_MODEL_KEYS = ("labels", "num_items_in_batch", "logits_to_keep", "completion_mask", "assistant_masks")


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
    backend: str = "torch",
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
    model: nn.Module, *, chunk_size: int | None = None, backend: str = "torch"
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
    logger.info("chunked linear-CE loss (%s backend) patched into %s.forward", backend, type(inner).__name__)
    return handle
