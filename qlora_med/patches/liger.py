"""Liger-Kernel's RMSNorm, RoPE and SwiGLU on the LLM inside one model instance, undoable.

Why not ``liger_kernel.transformers.apply_liger_kernel_to_mistral(model=...)``: even with ``model=`` it
rebinds ``modeling_mistral.MistralRMSNorm``, ``MistralMLP`` and ``apply_rotary_pos_emb`` process-wide, so
every Mistral built or run afterwards (a reference model, an eval copy) silently changes too. Here:

* RMSNorm and SwiGLU MLP modules of the LLM get an instance ``forward`` calling Liger's functional ops
  (``liger_rms_norm``, casting mode "llama"; ``liger_swiglu``), as Liger's own instance patching does.
* RoPE is a module-level function the attention forward looks up by name, so it cannot be set per
  instance. The module's ``apply_rotary_pos_emb`` is replaced by a pass-through dispatcher that calls
  Liger's RoPE only while a patched attention module's forward is running (a context variable set by
  that module's instance ``forward``; gradient-checkpoint recomputation goes through the same forward)
  and the original function otherwise. The original is put back when the last handle is undone.

Undo: ``handle.undo()`` removes the instance forwards (and the dispatcher, with the last handle). Whether
Liger runs at all (a recipe's ``liger: auto|on|off``) is decided in :func:`qlora_med.patches.select.resolve_liger`.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qlora_med.errors import ConfigError
from qlora_med.patches.handle import PatchHandle, set_instance_forward, unwrap_model

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral")  # RMSNorm (llama casting), SwiGLU MLP, standard RoPE

_ROPE_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("qlora_med_liger_rope", default=False)
_ROPE_INSTALLS: dict[int, list[Any]] = {}  # id(globals) -> [globals, original function, users]


def _liger_ops() -> tuple[Callable, Callable, Callable]:
    """(rms_norm, swiglu, rope) from Liger's public functional API; imported lazily."""
    from liger_kernel.transformers.functional import liger_rms_norm, liger_swiglu
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    return liger_rms_norm, liger_swiglu, liger_rotary_pos_emb


def find_llm(model: nn.Module) -> nn.Module | None:
    """The decoder stack (module with ``.layers``) of a supported LLM inside ``model``, e.g. LLaVA's
    ``model.language_model``; None if there is none."""
    for module in unwrap_model(model).modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if model_type in SUPPORTED_MODEL_TYPES and isinstance(getattr(module, "layers", None), nn.ModuleList):
            return module
    return None


def _install_rope_dispatcher(namespace: dict) -> Callable[[], None]:
    key = id(namespace)
    if key not in _ROPE_INSTALLS:
        original = namespace["apply_rotary_pos_emb"]
        liger_rope = _liger_ops()[2]

        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # noqa: ANN001, ANN202 - HF signature
            if _ROPE_ON.get():
                return liger_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

        namespace["apply_rotary_pos_emb"] = apply_rotary_pos_emb
        _ROPE_INSTALLS[key] = [namespace, original, 0]
    _ROPE_INSTALLS[key][2] += 1

    def release() -> None:
        entry = _ROPE_INSTALLS[key]
        entry[2] -= 1
        if entry[2] == 0:
            entry[0]["apply_rotary_pos_emb"] = entry[1]
            del _ROPE_INSTALLS[key]

    return release


def _rms_forward(module: nn.Module, rms_norm: Callable) -> Callable:
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(
            hidden_states, module.weight, module.variance_epsilon, casting_mode="llama", in_place=False
        )

    return forward


def _swiglu_forward(module: nn.Module, swiglu: Callable) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return module.down_proj(swiglu(module.gate_proj(x), module.up_proj(x)))

    return forward


def _rope_forward(original: Callable) -> Callable:
    def forward(*args: Any, **kwargs: Any) -> Any:
        token = _ROPE_ON.set(True)
        try:
            return original(*args, **kwargs)
        finally:
            _ROPE_ON.reset(token)

    return forward


def apply_liger_kernels(
    model: nn.Module,
    *,
    required: bool = False,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
) -> PatchHandle:
    """Put Liger's RMSNorm / RoPE / SwiGLU into the LLM of ``model`` (this instance only); returns a handle
    whose ``undo()`` restores it. Vision tower and projector are left alone. Without a supported LLM:
    nothing is patched (a warning), or a ConfigError when ``required`` (``liger: on``)."""
    handle = PatchHandle("Liger kernels")
    llm = find_llm(model)
    if llm is None:
        if required:
            raise ConfigError(
                f"liger mode 'on': no supported LLM ({', '.join(SUPPORTED_MODEL_TYPES)}) in the model"
            )
        logger.warning(
            "Liger kernels off: no supported LLM (%s) in the model", ", ".join(SUPPORTED_MODEL_TYPES)
        )
        return handle
    rms_op, swiglu_op, _ = _liger_ops()
    act = getattr(llm.config, "hidden_act", None)
    counts = {"RMSNorm": 0, "SwiGLU": 0, "RoPE": 0}
    for name, module in llm.named_modules():
        if rms_norm and type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            set_instance_forward(handle, name, module, _rms_forward(module, rms_op))
            counts["RMSNorm"] += 1
        elif (
            swiglu
            and act in ("silu", "swish")
            and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))
        ):
            set_instance_forward(handle, name, module, _swiglu_forward(module, swiglu_op))
            counts["SwiGLU"] += 1
        elif (
            rope and hasattr(module, "q_proj") and "apply_rotary_pos_emb" in type(module).forward.__globals__
        ):
            handle._restores.append(_install_rope_dispatcher(type(module).forward.__globals__))
            set_instance_forward(handle, name, module, _rope_forward(module.forward))
            counts["RoPE"] += 1
    logger.info(
        "Liger kernels on for the %s LLM: %s",
        llm.config.model_type,
        ", ".join(f"{n} x{c}" for n, c in counts.items() if c) or "nothing matched",
    )
    return handle
