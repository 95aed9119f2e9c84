"""The one kernel switch: every ``auto``/``on``/``off`` of a recipe's ``kernels:``, of
``model.attn_implementation`` and a stage's ``padding_free`` is resolved here for this device (one
resolver per switch, each logging the path taken); :func:`apply_kernels` applies the result to a model.

What ``auto`` means, and why (measured on a 2-core CPU, AVX2, fp32 compute; ``qlora-med bench``)::

    switch       | auto means                          | why, measured
    -------------+-------------------------------------+------------------------------------------------------
    liger        | on with CUDA, off on CPU            | Triton cannot compile on CPU (mode on: an error
                 |                                     | there, except under TRITON_INTERPRET=1)
    nf4_lora     | on: triton backend on CUDA (and     | CPU: level with PEFT's Linear4bit (MLP block 3-12%
                 | under the interpreter), torch       | faster, bench 0.94-1.18x: noise) and PEFT needs
                 | on CPU                              | 1.3-1.6x the kit's peak training memory. CUDA: not
                 |                                     | benchmarked on a GPU yet
    loss         | chunked on CPU, trl on CUDA         | chunked: labelled tokens only, no [tokens, vocab]
                 |                                     | logits: 1.3x full logits' throughput at 0.46x the
                 |                                     | memory; TRL's head scores every position off-GPU:
                 |                                     | 0.53x chunked's throughput at 3.5x the memory. On
                 |                                     | CUDA TRL's Triton path scores labelled tokens only
                 |                                     | and keeps its entropy / accuracy metrics
    loss backend | (chunked loss) liger on CUDA,       | Liger's fused linear-CE is Triton
                 | torch elsewhere                     |
    chunk_size   | rows for ~64 MiB of fp32 logits     | vs 256 MiB: 2% slower at 1,500 labelled rows x H 512,
                 | (kernels.linear_ce.CHUNK_BYTES; 523 | ~100 MiB (10%) less peak training memory
                 | rows at a 32k vocabulary)           |
    attention    | flash_attention_2 if flash-attn     | flash-attn's varlen kernel also serves packed rows
                 | imports on CUDA, else sdpa          |
    padding_free | (a bool) sdpa: one causal SDPA call | per-sample SDPA: 2.1x faster than that mask (fwd +
                 | per sample; flash-attn: varlen;     | bwd, 4 samples of 330-1024 tokens)
                 | eager: transformers' T x T mask     |
                 | (warned)                            |

Apply after ``setup_trainable`` (adapters exist) and before the trainer is built (TRL wraps the patched
forward with its own fused head).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from qlora_med.config.families import BY_MODEL_TYPE
from qlora_med.config.schema import KernelsConfig
from qlora_med.errors import ConfigError
from qlora_med.kernels.linear_ce import CHUNK_BYTES, default_chunk_size
from qlora_med.kernels.nf4_lora import interpreter_enabled
from qlora_med.patches.chunked_loss import lm_backbone_and_head, patch_causal_lm_loss
from qlora_med.patches.handle import PatchHandle, unwrap_model
from qlora_med.patches.liger import apply_liger_kernels
from qlora_med.patches.nf4_lora import patch_nf4_lora
from qlora_med.patches.padding_free import PACKED_SDPA, enable_padding_free

logger = logging.getLogger(__name__)

LIGER_MODES = ("auto", "on", "off")
LOSS_WITHOUT_METRICS = ("chunked",)


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def resolve_liger(mode: str) -> bool:
    """Whether Liger's kernels go into the LLM: ``auto`` where Triton compiles (CUDA); ``on`` insists."""
    if mode not in LIGER_MODES:
        raise ConfigError(f"liger mode must be one of {LIGER_MODES}, got {mode!r}")
    if mode == "off":
        enabled, why = False, "mode=off"
    elif torch.cuda.is_available():
        enabled, why = True, f"mode={mode}, CUDA available"
    elif mode == "on":
        if not interpreter_enabled():
            raise ConfigError(
                "liger mode 'on' needs a CUDA GPU (Triton cannot compile here); use 'auto' or 'off'"
            )
        enabled, why = True, "mode=on, Triton interpreter (CPU, slow: tests only)"
    else:
        enabled, why = False, "mode=auto, no CUDA: Triton cannot compile here, PyTorch ops kept"
    logger.info("Liger kernels %s (%s)", "on" if enabled else "off", why)
    return enabled


def resolve_nf4_lora(mode: str, device: torch.device) -> str | None:
    """Backend of the fused NF4+LoRA function (``triton`` on CUDA or under the interpreter, ``torch`` on CPU),
    or None when off (PEFT's ``Linear4bit`` forward)."""
    if mode == "off":
        backend, why = None, "mode=off, PEFT Linear4bit"
    elif device.type == "cuda":
        backend, why = "triton", f"mode={mode}, CUDA"
    elif interpreter_enabled():
        backend, why = "triton", f"mode={mode}, Triton interpreter (CPU, slow: tests only)"
    else:
        backend, why = "torch", f"mode={mode}, no CUDA: the same autograd function with a PyTorch matmul"
    logger.info("fused NF4+LoRA %s (%s)", backend or "off", why)
    return backend


def chunked_loss_blocker(model: nn.Module) -> str:
    """Why the chunked loss cannot serve this model ("" when it can): its family's entry in the family table,
    or a head the chunked loss cannot reproduce (quantized, softcapped logits)."""
    inner = unwrap_model(model)
    family = BY_MODEL_TYPE.get(getattr(inner.config, "model_type", None))
    if family is not None and family.chunked_loss:
        return family.chunked_loss
    try:
        lm_backbone_and_head(inner)
    except ValueError as err:
        return str(err)
    return ""


def resolve_loss(mode: str, device: torch.device, model: nn.Module | None = None) -> str:
    """``auto`` -> ``chunked`` on CPU, ``trl`` on CUDA (and wherever the chunked loss cannot serve the model,
    logged); other modes as given (``chunked`` on a model it cannot serve: ConfigError)."""
    loss = mode
    if mode == "auto":
        loss = "trl" if device.type == "cuda" else "chunked"
    blocker = chunked_loss_blocker(model) if loss == "chunked" and model is not None else ""
    if blocker and mode == "chunked":
        raise ConfigError(f"kernels.loss: chunked cannot serve this model ({blocker}); use kernels.loss=auto or trl")
    if blocker:
        logger.info("loss trl: the chunked loss is off for this model (%s)", blocker)
        return "trl"
    logger.info("loss %s (mode=%s%s)", loss, mode, f", {device.type}" if mode == "auto" else "")
    return loss


def resolve_loss_backend(device: torch.device) -> str:
    """Linear-CE backend of the chunked loss: ``liger`` (Triton) on CUDA, ``torch`` elsewhere."""
    backend = "liger" if device.type == "cuda" else "torch"
    logger.info("chunked loss: %s linear-CE backend (%s)", backend, device.type)
    return backend


def resolve_chunk_size(chunk_size: int | None, model: nn.Module) -> int:
    """``kernels.chunk_size``, or rows for ~:data:`CHUNK_BYTES` of fp32 logits at the model's vocabulary."""
    if chunk_size is not None:
        logger.info("chunked loss: %d rows per chunk (kernels.chunk_size)", chunk_size)
        return chunk_size
    vocab = unwrap_model(model).get_output_embeddings().weight.shape[0]
    rows = default_chunk_size(vocab)
    logger.info(
        "chunked loss: %d rows per chunk (~%d MiB of fp32 logits, vocab %d)", rows, CHUNK_BYTES >> 20, vocab
    )
    return rows


def resolve_attn_implementation(name: str) -> str:
    """``auto``: flash_attention_2 when flash-attn imports on CUDA, else sdpa. Logs the path taken."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            logger.info("attention: flash_attention_2 (flash-attn installed)")
            return "flash_attention_2"
        except ImportError:
            logger.info("attention: sdpa (flash-attn not installed; `pip install qlora-med[cuda]` to enable)")
    else:
        logger.info("attention: sdpa (no CUDA device)")
    return "sdpa"


def _family_blocker(model: nn.Module) -> tuple[str, str]:
    """(family name, why its rows cannot be packed) from the family table; ("", "") when they can."""
    family = BY_MODEL_TYPE.get(getattr(unwrap_model(model).config, "model_type", None))
    return (family.name, family.padding_free) if family is not None and family.padding_free else ("", "")


def _packed_attention(model: nn.Module) -> tuple[str, str]:
    """How packed rows keep attention within each sample under the LLM's attention implementation:
    (``packed_sdpa`` | ``varlen`` | ``mask``, the implementation's name)."""
    attn_implementation = str(unwrap_model(model).config.get_text_config()._attn_implementation)
    if attn_implementation in ("sdpa", PACKED_SDPA):
        return "packed_sdpa", attn_implementation
    if attn_implementation.startswith("flash_attention"):
        return "varlen", attn_implementation
    return "mask", attn_implementation


def padding_free_blocker(model: nn.Module) -> str:
    """Why ``padding_free: auto`` leaves this model's batches padded ("" when packing pays): its family's entry in
    the family table, or eager attention (packed rows would need transformers' T x T mask)."""
    name, why = _family_blocker(model)
    if why:
        return f"{name}: {why}"
    path, attn_implementation = _packed_attention(model)
    return f"{attn_implementation} attention would need a T x T block-diagonal mask" if path == "mask" else ""


def resolve_padding_free_setting(setting: bool | str, model: nn.Module) -> bool:
    """The stage's ``padding_free`` as a bool: ``auto`` is on unless :func:`padding_free_blocker` says why not
    (logged); true and false as given."""
    if setting != "auto":
        return bool(setting)
    blocker = padding_free_blocker(model)
    logger.info("padding-free batches (auto): %s", f"off, padded batches ({blocker})" if blocker else "on")
    return not blocker


def resolve_padding_free(enabled: bool, model: nn.Module) -> str | None:
    """How packed rows keep attention within each sample under the LLM's attention (None when off):
    ``packed_sdpa`` (sdpa), ``varlen`` (flash-attn) or ``mask`` (eager: transformers' T x T mask, warned)."""
    if not enabled:
        return None
    name, why = _family_blocker(model)
    if why:
        logger.warning("padding-free batches: off for %s, padded batches instead (%s)", name, why)
        return None
    path, attn_implementation = _packed_attention(model)
    if path == "packed_sdpa":
        logger.info("padding-free batches: packed rows, one causal SDPA call per sample (%s)", PACKED_SDPA)
    elif path == "varlen":
        logger.info(
            "padding-free batches: packed rows, %s varlen attention over cu_seq_lens", attn_implementation
        )
    else:
        logger.warning(
            "padding-free batches with %s attention: transformers builds a T x T block-diagonal mask from "
            "position_ids (correct but slow); use attn_implementation sdpa or flash_attention_2",
            attn_implementation,
        )
    return path


@dataclass
class KernelSetup:
    """The resolved choices and the patches that implement them (``undo()`` restores the model)."""

    liger: bool
    nf4_lora: str | None
    nf4_lora_modules: int
    loss: str
    padding_free: bool  # as resolved: off where the family cannot pack rows
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


def apply_kernels(model: nn.Module, cfg: KernelsConfig, padding_free: bool | str = False) -> KernelSetup:
    """Resolve ``cfg`` (and ``padding_free``: a stage's setting) for the model's device and apply Liger, the fused
    NF4+LoRA forward, the loss path and padding-free attention to ``model``; logs one line saying which path
    runs. Returns the setup; the trainer reads ``setup.loss``."""
    device = model_device(model)
    handles: list[PatchHandle] = []
    liger = resolve_liger(cfg.liger)
    n_liger = 0
    if liger:
        patched = apply_liger_kernels(model, required=cfg.liger == "on")
        handles.append(patched)
        n_liger = len(patched)
    backend = resolve_nf4_lora(cfg.nf4_lora, device)
    n_fused = 0
    if backend is not None:
        fused = patch_nf4_lora(model, backend=backend)
        handles.append(fused)
        n_fused = len(fused)
    loss = resolve_loss(cfg.loss, device, model)
    chunk = None
    if loss == "chunked":
        chunk = resolve_chunk_size(cfg.chunk_size, model)
        handles.append(patch_causal_lm_loss(model, chunk_size=chunk, backend=resolve_loss_backend(device)))
    padding_free = resolve_padding_free(resolve_padding_free_setting(padding_free, model), model) is not None
    if padding_free:
        handles.append(enable_padding_free(model))
    setup = KernelSetup(bool(n_liger), backend, n_fused, loss, padding_free, chunk, handles)
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
