"""Chunked linear cross-entropy: ``CE(h Wᵀ + b, labels)`` without the full [tokens, vocab] logits.

Only labelled tokens (``labels != ignore_index``) are touched: in a VLM batch most positions are image or
prompt tokens, so they are dropped before the head matmul. The rest is processed ``chunk_size`` rows at a
time. Because CE is the last op, its gradient is computed in the forward pass (as in Liger): for a chunk
with logits z = h Wᵀ + b, p = softmax(z), one-hot targets Y and normaliser n::

    loss  = Σ_rows (logsumexp(z) - z_target) / n
    ∂L/∂z = (p - Y) / n          ∂L/∂h = (∂L/∂z) W          ∂L/∂W += (∂L/∂z)ᵀ h          ∂L/∂b += Σ_rows ∂L/∂z

so the forward keeps ∂L/∂h for the labelled rows (same size as h) and, only if W needs a gradient, an fp32
[V, H] accumulator; backward just scales them by the incoming scalar gradient. Peak extra memory is one
[chunk_size, V] fp32 block instead of [tokens, V]. Logits are computed in the inputs' dtype and upcast to
fp32 for the softmax, as transformers' ``ForCausalLMLoss`` does.

Backends: ``torch`` (the chunked function below; any device), ``liger`` (Liger-Kernel's Triton
``LigerFusedLinearCrossEntropyFunction``, for CUDA); the caller names it
(:func:`qlora_med.patches.select.resolve_loss_backend` picks it for a model).
Normaliser: ``num_items_in_batch`` if given (sum / n, as transformers does for gradient accumulation),
else the number of labelled tokens for ``reduction="mean"``, else 1 (``"sum"``). A batch with no
labelled token gives a loss of 0 (with zero gradients) for every reduction, where torch's mean gives nan.
"""

from __future__ import annotations

import torch

BACKENDS = ("torch", "liger")
# fp32 logits per chunk when chunk_size is not given: the one default, also used by qlora_med.patches.select
# (why 64 MiB, measured: the table in that module's docstring).
CHUNK_BYTES = 64 * 2**20
MIN_CHUNK_ROWS = 64


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one fp32 [rows, vocab] block is about :data:`CHUNK_BYTES` (at least 64 rows)."""
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * max(vocab_size, 1)))


class ChunkedLinearCEFunction(torch.autograd.Function):
    """Sum of per-token CE over the rows ``index`` of ``hidden``, divided by ``normaliser``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, targets, normaliser, chunk_size):  # noqa: ANN001, ANN205
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h_sel = hidden.index_select(0, index)
        n_rows = h_sel.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(h_sel) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, n_rows, chunk_size):
            h_c = h_sel[start : start + chunk_size]
            t_c = targets[start : start + chunk_size]
            logits = h_c @ weight.t()
            if bias is not None:
                logits = logits + bias
            logits = logits.float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t_c[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(grad.shape[0], device=grad.device), t_c] -= 1.0
                grad = grad.div_(normaliser)
                if need_b:
                    grad_b += grad.sum(0)
                grad = grad.to(h_c.dtype)
                if need_h:
                    grad_h[start : start + chunk_size] = grad.to(weight.dtype) @ weight
                if need_w:
                    grad_w += (grad.t() @ h_c).float()
        ctx.save_for_backward(index, grad_h, grad_w, grad_b)
        ctx.hidden_shape, ctx.dtypes = (
            hidden.shape,
            (hidden.dtype, weight.dtype, getattr(bias, "dtype", None)),
        )
        return loss / normaliser

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        index, grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        dh = dw = db = None
        if grad_h is not None:
            dh = torch.zeros(ctx.hidden_shape, dtype=h_dtype, device=grad_h.device)
            dh.index_copy_(0, index, grad_h * grad_out.to(h_dtype))
        if grad_w is not None:
            dw = (grad_w * grad_out).to(w_dtype)
        if grad_b is not None:
            db = (grad_b * grad_out).to(b_dtype)
        return dh, dw, db, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """CE of ``hidden @ weight.T (+ bias)`` against ``labels`` (already aligned; no shift), fp32 scalar.

    ``hidden`` [..., H], ``labels`` [...] with ``ignore_index`` for unlabelled positions, ``weight`` [V, H].
    ``chunk_size`` (torch backend): rows per chunk, default :func:`default_chunk_size`.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    flat = labels.reshape(-1).to(h2.device)
    if flat.shape[0] != h2.shape[0]:
        raise ValueError(f"{h2.shape[0]} hidden rows but {flat.shape[0]} labels")
    index = (flat != ignore_index).nonzero().squeeze(1)
    if index.numel() == 0:  # keep the graph (and DDP) intact: zero loss, zero grads
        zero = h2.sum() * 0.0 + weight.sum() * 0.0
        return (zero + bias.sum() * 0.0 if bias is not None else zero).float()
    if num_items_in_batch is not None:
        normaliser = num_items_in_batch
        if torch.is_tensor(normaliser):
            normaliser = normaliser.to(device=h2.device, dtype=torch.float32)
    else:
        normaliser = float(index.numel()) if reduction == "mean" else 1.0
    targets = flat.index_select(0, index)
    if backend == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        total = liger_fused_linear_cross_entropy(
            h2.index_select(0, index), weight, targets, bias, ignore_index=ignore_index, reduction="sum",
            accum_dtype=torch.float32 if weight.requires_grad else None,  # fp32 [V, H] grad only if trained
        )  # fmt: skip
        return total.float() / normaliser
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    return ChunkedLinearCEFunction.apply(h2, weight, bias, index, targets, normaliser, chunk)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain ``F.cross_entropy`` on the full fp32-upcast logits (transformers' ``fixed_cross_entropy``)."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    logits = logits.reshape(-1, logits.shape[-1])
    flat = labels.reshape(-1)
    if num_items_in_batch is not None:
        loss = torch.nn.functional.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="sum")
        return loss / num_items_in_batch
    return torch.nn.functional.cross_entropy(logits, flat, ignore_index=ignore_index, reduction=reduction)
