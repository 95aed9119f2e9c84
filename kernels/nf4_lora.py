"""Fused NF4 dequant + matmul + LoRA for a frozen bitsandbytes 4-bit weight.

Forward, for ``x`` [M, K], NF4 weight ``W`` [N, K], LoRA ``A`` [r, K], ``B`` [N, r], scale ``s``::

    y = x Wᵀ + s (x Aᵀ) Bᵀ + b

Backward (W and b frozen; dy = ∂L/∂y [M, N]; let xa = x Aᵀ [M, r], dyB = dy B [M, r])::

    y_ij = Σ_k x_ik W_jk + s Σ_t xa_it B_jt,   xa_it = Σ_k x_ik A_tk
    ∂L/∂x  = dy W + s (dy B) A      = dy W + s dyB A          [M, K]
    ∂L/∂A  = s Σ_i Σ_j dy_ij B_jt x_ik = s dyBᵀ x             [r, K]
    ∂L/∂B  = s Σ_i dy_ij xa_it         = s dyᵀ xa             [N, r]

With LoRA dropout the LoRA branch sees ``x_d = dropout(x)``: then ``xa = x_d Aᵀ``, ``∂L/∂A = s dyBᵀ x_d``
and ``∂L/∂x_d = s dyB A`` is returned separately (autograd takes it through the dropout).
Saved for backward: ``x_d`` (or ``x``) and ``xa`` only; the dequantized W is never stored.

Design: **tile-wise dequantization inside the matmul** (one Triton kernel, used for both ``x Wᵀ`` in the
forward and ``dy W`` in the backward). Each program dequantizes the [BLOCK_Q, BLOCK_P] tile of W it needs
straight from bitsandbytes' packed storage (two 4-bit codes per byte, high nibble first, one absmax per
``blocksize`` consecutive elements, the absmax itself 8-bit quantized with double quant), so the
[N, K] weight in 16/32-bit is never written to memory: no transient out×in buffer and 0.5 instead of
~4.5 bytes of traffic per weight element. The LoRA up-projection ``s · xa Bᵀ`` (or ``s · dyB A``) is added
in the same kernel's epilogue, so the M×N output is written once (PEFT's path writes/reads it ~6 times:
base, clone, B-projection, scaling, add, casts). The small rank-r products run in cuBLAS. A stand-alone
Triton dequant kernel (:func:`nf4_dequantize`) shares the same tile code; it is tested against
``bitsandbytes.functional.dequantize_4bit`` and is the fallback if GPU benchmarks show cuBLAS winning at
large M. The same autograd function has a "torch" backend (bitsandbytes dequant + matmul, re-dequantizing
in backward) for devices without Triton, which keeps the memory savings. The caller names the backend;
:func:`qlora_med.patches.select.resolve_nf4_lora` picks it for a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from bitsandbytes.functional import QuantState, dequantize_4bit

BACKENDS = ("triton", "torch")  # which one a model uses is decided in qlora_med.patches.select


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str, device: torch.device) -> None:
    """Raise unless ``backend`` is one of :data:`BACKENDS` and can run on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError("the triton backend needs a CUDA device or TRITON_INTERPRET=1")


@dataclass(frozen=True)
class NF4Weight:
    """bitsandbytes' NF4 storage of one weight of shape ``shape`` = (out_features, in_features)."""

    packed: torch.Tensor  # uint8 [ceil(numel / 2)], row-major, element 2i in the high nibble
    absmax: torch.Tensor  # fp32 [n_blocks], or uint8 [n_blocks] with double quant
    code: torch.Tensor  # fp32 [16], the NF4 table
    blocksize: int
    shape: tuple[int, int]
    quant_state: QuantState
    absmax2: torch.Tensor | None = None  # fp32 [ceil(n_blocks / blocksize2)]
    code2: torch.Tensor | None = None  # fp32 [256]
    offset: torch.Tensor | None = None  # fp32 [1]
    blocksize2: int = 256

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @classmethod
    def from_bnb(cls, weight: torch.Tensor, quant_state: QuantState | None = None) -> NF4Weight:
        """Wrap a ``bnb.nn.Params4bit`` (or its packed data plus ``quant_state``) without copying."""
        qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if qs is None:
            raise ValueError("weight has no quant_state (not quantized yet?)")
        if qs.quant_type != "nf4":
            raise ValueError(f"only nf4 is supported, got {qs.quant_type!r}")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("weight is in bitsandbytes' CPU inference packing; use the original module")
        if len(qs.shape) != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(qs.shape)}")
        packed = weight.data.view(torch.uint8).reshape(-1)
        if qs.nested:
            return cls(
                packed, qs.absmax, qs.code.float(), qs.blocksize, tuple(qs.shape), qs,
                qs.state2.absmax.float(), qs.state2.code.float(),
                qs.offset.reshape(1).float(), qs.state2.blocksize,
            )  # fmt: skip
        return cls(packed, qs.absmax.float(), qs.code.float(), qs.blocksize, tuple(qs.shape), qs)


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _nf4_load(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx, mask,
              BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):  # fmt: skip
    """fp32 values of the flat weight elements ``idx`` (any shape), exactly as bitsandbytes computes them."""
    byte = tl.load(w_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    nib = tl.where(idx % 2 == 0, byte >> 4, byte & 0xF)
    val = tl.load(code_ptr + nib, mask=mask, other=0.0)
    blk = idx // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0)
        scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * a2 + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return val * scale


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """``x.to(dtype)``. Under the CPU interpreter, which truncates fp32 -> bf16 (GPUs round to nearest
    even), round by hand so interpreter results match GPU numerics."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + a @ b`` in fp32. The interpreter multiplies bf16 operands as raw integers, so there the
    (exactly representable) bf16/fp16 values are upcast to fp32 first."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _nf4_dequant_kernel(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, numel,
                        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                        IDX64: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    start = tl.program_id(0)
    if IDX64:
        start = start.to(tl.int64)
    idx = start * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    val = _nf4_load(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx, mask,
                    BLOCKSIZE, BLOCKSIZE2, NESTED)  # fmt: skip
    tl.store(out_ptr + idx, _cast(val, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _nf4_lora_mm_kernel(
    a_ptr, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, u_ptr, v_ptr, bias_ptr, c_ptr,
    M, P, Q, K_IN, R, scale,
    stride_am, stride_aq, stride_um, stride_ur, stride_vr, stride_vp, stride_cm, stride_cp,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, TRANS_W: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, IDX64: tl.constexpr, INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """C[M, P] = A[M, Q] @ op(W) + scale * U[M, R] @ V[R, P] + bias[P].

    op(W) = Wᵀ (TRANS_W, forward: Q = in, P = out) or W (backward: Q = out, P = in); W is [out, K_IN].
    """
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_p = tl.cdiv(P, BLOCK_P)
    group = GROUP_M * n_p  # grouped ordering: neighbouring programs share W tiles in L2
    first_m = (pid // group) * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_p = (pid % group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.arange(0, BLOCK_Q)
    if IDX64:
        offs_p = offs_p.to(tl.int64)
        offs_q = offs_q.to(tl.int64)
    mask_m = offs_m < M
    mask_p = offs_p < P
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        q = q0 + offs_q
        mask_q = q < Q
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + q[None, :] * stride_aq,
                    mask=mask_m[:, None] & mask_q[None, :], other=0.0)  # fmt: skip
        if TRANS_W:
            idx = offs_p[None, :] * K_IN + q[:, None]
        else:
            idx = q[:, None] * K_IN + offs_p[None, :]
        w = _nf4_load(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx,
                      mask_q[:, None] & mask_p[None, :], BLOCKSIZE, BLOCKSIZE2, NESTED)  # fmt: skip
        acc = _dot(a, _cast(w, a.dtype, INTERPRET), acc, PRECISION, INTERPRET)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # fmt: skip
        v = tl.load(v_ptr + offs_r[:, None] * stride_vr + offs_p[None, :] * stride_vp,
                    mask=mask_r[:, None] & mask_p[None, :], other=0.0)  # fmt: skip
        acc += scale * _dot(u, v, tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32), PRECISION, INTERPRET)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + offs_m[:, None] * stride_cm + offs_p[None, :] * stride_cp
    tl.store(c, _cast(acc, c_ptr.dtype.element_ty, INTERPRET), mask=mask_m[:, None] & mask_p[None, :])


# ----------------------------------------------------------------------------- launchers


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _state_args(w: NF4Weight) -> tuple[torch.Tensor, ...]:
    if w.nested:
        return (w.packed, w.absmax, w.code, w.absmax2, w.code2, w.offset)
    return (w.packed, w.absmax, w.code, w.absmax, w.code, w.absmax)  # unused slots: any tensor


def nf4_dequantize(weight: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize the whole weight with the Triton kernel (same tile code as the fused matmul)."""
    numel = weight.shape[0] * weight.shape[1]
    out = torch.empty(weight.shape, dtype=dtype, device=weight.packed.device)
    block = _pow2(numel, 1024, 16384) if interpreter_enabled() else 1024
    _nf4_dequant_kernel[(triton.cdiv(numel, block),)](
        *_state_args(weight), out, numel, BLOCKSIZE=weight.blocksize, BLOCKSIZE2=weight.blocksize2,
        NESTED=weight.nested, IDX64=numel + block >= 2**31, INTERPRET=interpreter_enabled(), BLOCK=block,
    )  # fmt: skip
    return out


def nf4_lora_matmul(
    a: torch.Tensor,
    weight: NF4Weight,
    transpose_w: bool,
    lora_u: torch.Tensor | None = None,
    lora_v: torch.Tensor | None = None,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton launcher: ``a @ op(W) + scale * lora_u @ lora_v (+ bias)``, op(W) = Wᵀ if ``transpose_w``.

    ``a`` [M, Q] (fp32/bf16/fp16, any strides); ``lora_u`` [M, r], ``lora_v`` [r, P] in ``a``'s dtype.
    Returns [M, P] in ``a``'s dtype, accumulated in fp32.
    """
    n_out, k_in = weight.shape
    q_dim, p_dim = (k_in, n_out) if transpose_w else (n_out, k_in)
    if a.dim() != 2 or a.shape[1] != q_dim:
        raise ValueError(f"a must be [M, {q_dim}], got {tuple(a.shape)}")
    m = a.shape[0]
    out = torch.empty((m, p_dim), dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    has_lora = lora_u is not None and lora_v is not None
    rank = lora_u.shape[1] if has_lora else 0
    if rank > 256:
        raise ValueError(f"LoRA rank {rank} > 256 is not supported by the fused kernel")
    u = lora_u if has_lora else a
    v = lora_v if has_lora else a
    if interpreter_enabled():  # few, large programs: the interpreter pays per program
        bm, bp, bq, warps, stages = _pow2(m, 16, 64), _pow2(p_dim, 16, 64), _pow2(q_dim, 16, 64), 4, 1
    else:  # starting point; to be replaced by benchmarked configs
        bm, bp, bq = _pow2(m, 16, 128), _pow2(p_dim, 32, 128), 64
        warps, stages = (8 if bm * bp >= 128 * 128 else 4), 3
    fp32_ieee = a.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    grid = (triton.cdiv(m, bm) * triton.cdiv(p_dim, bp),)
    _nf4_lora_mm_kernel[grid](
        a, *_state_args(weight), u, v, bias if bias is not None else a, out,
        m, p_dim, q_dim, k_in, rank, float(scale),
        a.stride(0), a.stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        BLOCKSIZE=weight.blocksize, BLOCKSIZE2=weight.blocksize2, NESTED=weight.nested,
        TRANS_W=transpose_w, HAS_LORA=has_lora, HAS_BIAS=bias is not None,
        IDX64=n_out * k_in >= 2**31, INTERPRET=interpreter_enabled(),
        PRECISION="ieee" if fp32_ieee else "tf32",
        BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, BLOCK_R=_pow2(rank, 16, 256), GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def _matmul(
    a: torch.Tensor,
    weight: NF4Weight,
    transpose_w: bool,
    u: torch.Tensor | None,
    v: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """``a @ op(W) + scale * u @ v + bias`` with Triton, or bitsandbytes dequant (to the weight's
    original dtype, as ``bnb.matmul_4bit`` does) + torch matmul; the dequantized W is freed at once."""
    if backend == "triton":
        return nf4_lora_matmul(a, weight, transpose_w, u, v, scale, bias)
    w = dequantize_4bit(weight.packed.view(-1, 1), weight.quant_state).to(a.dtype)
    out = a @ (w.t() if transpose_w else w)
    del w
    if u is not None:
        out.addmm_(u, v, alpha=scale)
    if bias is not None:
        out += bias
    return out


# ----------------------------------------------------------------------------- autograd


class NF4LoRAFunction(torch.autograd.Function):
    """``y = x Wᵀ + s (x_d Aᵀ) Bᵀ + b`` with W frozen NF4; see the module docstring for the backward."""

    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, bias, weight, scaling, backend):  # noqa: ANN001, ANN205
        with torch.autocast(x.device.type, enabled=False):
            a = lora_a.to(x.dtype)
            b = lora_b.to(x.dtype)
            xl = x if x_lora is None else x_lora.to(x.dtype)
            xa = xl @ a.t()
            bias_c = bias.to(x.dtype) if bias is not None else None
            y = _matmul(x, weight, True, xa, b.t(), scaling, bias_c, backend)
        ctx.save_for_backward(xl, xa, a, b)
        ctx.weight, ctx.scaling, ctx.backend = weight, scaling, backend
        ctx.fused_x = x_lora is None
        ctx.dtypes = (x.dtype, lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        xl, xa, a, b = ctx.saved_tensors
        s = ctx.scaling
        x_dtype, a_dtype, b_dtype, bias_dtype = ctx.dtypes
        need_x, need_xl, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dx = dxl = da = db = dbias = None
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.to(x_dtype)
            dyb = dy @ b  # [M, r]
            if need_x:
                u, v = (dyb, a) if ctx.fused_x else (None, None)
                dx = _matmul(dy, ctx.weight, False, u, v, s, None, ctx.backend)
            if need_xl and not ctx.fused_x:
                dxl = (dyb @ a).mul_(s)
            if need_a:
                da = (dyb.t() @ xl).mul_(s).to(a_dtype)
            if need_b:
                db = (dy.t() @ xa).mul_(s).to(b_dtype)
            if need_bias:
                dbias = dy.sum(0).to(bias_dtype)
        return dx, dxl, da, db, dbias, None, None, None


def nf4_lora_linear(
    x: torch.Tensor,
    weight: NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Fused ``x Wᵀ + scaling · (x_lora Aᵀ) Bᵀ + bias`` (``x_lora`` defaults to ``x``), any leading dims.

    Computes in ``x``'s dtype (cast x to the layer's compute dtype first); ``lora_a`` [r, K] and
    ``lora_b`` [N, r] may be fp32 masters: their grads come back in their own dtype. ``backend``:
    ``triton`` (CUDA, or the interpreter) or ``torch`` (any device).
    """
    check_backend(backend, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xl2 = None if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1])
    y = NF4LoRAFunction.apply(x2, xl2, lora_a, lora_b, bias, weight, float(scaling), backend)
    return y.reshape(*lead, weight.shape[0])


def nf4_lora_reference(
    x: torch.Tensor,
    weight: NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch: ``bitsandbytes.functional.dequantize_4bit`` then autograd through F.linear."""
    w = dequantize_4bit(weight.packed.view(-1, 1), weight.quant_state).to(x.dtype)
    xl = x if x_lora is None else x_lora
    lora = torch.nn.functional.linear(torch.nn.functional.linear(xl, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    bias_c = None if bias is None else bias.to(x.dtype)
    return torch.nn.functional.linear(x, w, bias_c) + scaling * lora
