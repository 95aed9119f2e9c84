"""Fused NF4 + LoRA kernel vs its bitsandbytes/PyTorch reference, forward and backward.

Triton runs on CPU only in its interpreter, which must be switched on (TRITON_INTERPRET=1) before the
kernels are decorated. So the ``test_child_*`` tests run in a child pytest process with that variable
set (started by ``test_triton_interpreter``), and the variable never reaches the rest of the suite.

Tolerances: max |got - ref| <= tol * max |ref| with tol = 1e-5 (fp32), 2e-3 (fp16), 1e-2 (bf16: ~2.5
ulps at the largest value; the fused kernel rounds once where the reference rounds base and LoRA
outputs separately). The dequantized weight must equal bitsandbytes' exactly (interpreter).
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch
from helpers.triton_child import child_only, run_children  # noqa: E402
from qlora_med.kernels.nf4_lora import (
    NF4Weight,
    check_backend,
    interpreter_enabled,
    nf4_lora_linear,
    nf4_lora_reference,
)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def test_triton_interpreter() -> None:
    """Run this file's ``test_child_*`` tests under ``TRITON_INTERPRET=1`` in a child process."""
    run_children(__file__)


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != {ref.dtype}"
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]} * {scale:.3g}"


def make_case(
    m: int, k: int, n: int, rank: int, dtype: torch.dtype, nested: bool, blocksize: int = 64, seed: int = 0
) -> tuple[NF4Weight, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NF4 weight [n, k] quantized from ``dtype`` (bnb keeps that as its dequant dtype), x [m, k] in
    ``dtype``, fp32 LoRA masters A [rank, k], B [n, rank] (B non-zero), bias [n]; outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    w_full = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    packed, qs = bnbf.quantize_4bit(w_full, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    x = torch.randn(m, k, generator=g).to(dtype)
    lora_a = torch.randn(rank, k, generator=g) / k**0.5
    lora_b = torch.randn(n, rank, generator=g) * 0.5
    bias = torch.randn(n, generator=g).to(dtype)
    return NF4Weight.from_bnb(packed, qs), w_full, x, lora_a, lora_b, bias


def fwd_bwd(fn, x, lora_a, lora_b, dy, mask=None, **kw) -> list[torch.Tensor]:  # noqa: ANN001
    """[y, dx, dA, dB] of ``fn`` with scaling 2; ``mask`` (dropout) makes the LoRA input ``x * mask``."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b)]
    x_lora = None if mask is None else leaves[0] * mask
    y = fn(leaves[0], kw.pop("weight"), leaves[1], leaves[2], 2.0, x_lora=x_lora, **kw)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


# ----------------------------------------------------------------------------- interpreter (child)


@child_only
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n", "k", "blocksize"), [(123, 5, 64), (77, 123, 64), (33, 130, 128)])
def test_child_dequant_matches_bitsandbytes(
    n: int, k: int, blocksize: int, dtype: torch.dtype, nested: bool
) -> None:
    from qlora_med.kernels.nf4_lora import nf4_dequantize

    weight, *_ = make_case(1, k, n, 2, dtype, nested, blocksize)
    ref = bnbf.dequantize_4bit(weight.packed.view(-1, 1), weight.quant_state)
    got = nf4_dequantize(weight, dtype)
    assert got.dtype == ref.dtype == dtype
    assert torch.equal(got, ref), f"max diff {(got.float() - ref.float()).abs().max().item()}"


@child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("m", "k", "n", "rank", "nested", "bias", "dropout"),
    [
        (5, 123, 77, 4, True, True, False),  # odd everything, double quant, bias
        (5, 123, 77, 4, False, False, True),  # LoRA dropout: separate x for the LoRA branch
        (70, 96, 130, 3, True, False, False),  # several M and N tiles, rank not a power of 2
        (1, 64, 16, 20, True, True, False),  # single row, rank > 16
    ],
)
def test_child_fused_matches_reference(
    m: int, k: int, n: int, rank: int, nested: bool, bias: bool, dropout: bool, dtype: torch.dtype
) -> None:
    weight, _, x, lora_a, lora_b, b = make_case(m, k, n, rank, dtype, nested)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    mask = (
        (torch.rand(m, k, generator=torch.Generator().manual_seed(2)) > 0.3).to(dtype) / 0.7
        if dropout
        else None
    )
    kw = {"bias": b if bias else None, "mask": mask}
    got = fwd_bwd(nf4_lora_linear, x, lora_a, lora_b, dy, weight=weight, backend="triton", **kw)
    ref = fwd_bwd(nf4_lora_reference, x, lora_a, lora_b, dy, weight=weight, **kw)
    for name, g, r in zip(("y", "dx", "dA", "dB"), got, ref, strict=True):
        assert_close(g, r, dtype, name)


@child_only
def test_child_batched_strided_input_and_full_precision_error() -> None:
    """3-D, non-contiguous x; the fused error vs an unquantized layer stays within NF4's own error."""
    weight, w_full, _, lora_a, lora_b, b = make_case(1, 96, 40, 4, torch.float32, True)
    x = torch.randn(96, 3, 7).permute(1, 2, 0)  # [3, 7, 96], last dim strided
    y = nf4_lora_linear(x, weight, lora_a, lora_b, 2.0, b, backend="triton")
    y_ref = nf4_lora_reference(x, weight, lora_a, lora_b, 2.0, b)
    assert y.shape == (3, 7, 40)
    assert_close(y, y_ref, torch.float32, "y")
    y_full = x @ w_full.t() + 2.0 * (x @ lora_a.t()) @ lora_b.t() + b
    nf4_err = (y_ref - y_full).abs().max().item()
    assert 0 < (y - y_full).abs().max().item() <= nf4_err * 1.001 + 1e-6


# ----------------------------------------------------------------------------- in process


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout", [False, True])
def test_torch_backend_matches_reference(dtype: torch.dtype, dropout: bool) -> None:
    # K even: for odd K bitsandbytes' CPU dequant falls back to a torch.compile'd function (slow to start)
    weight, _, x, lora_a, lora_b, b = make_case(5, 124, 77, 4, dtype, nested=True)
    dy = torch.randn(5, 77).to(dtype)
    mask = (torch.rand(5, 124) > 0.3).to(dtype) / 0.7 if dropout else None
    got = fwd_bwd(nf4_lora_linear, x, lora_a, lora_b, dy, mask, weight=weight, bias=b, backend="torch")
    ref = fwd_bwd(nf4_lora_reference, x, lora_a, lora_b, dy, mask, weight=weight, bias=b)
    for name, g, r in zip(("y", "dx", "dA", "dB"), got, ref, strict=True):
        assert_close(g, r, dtype, name)
    assert got[2].dtype == got[3].dtype == torch.float32  # LoRA grads in the masters' dtype


def test_backend_checks_and_input_checks() -> None:
    check_backend("torch", torch.device("cpu"))
    check_backend("triton", torch.device("cuda"))
    if not interpreter_enabled():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            check_backend("triton", torch.device("cpu"))
    for name in ("cuda", "auto"):  # "auto" is resolved by qlora_med.patches.select, not here
        with pytest.raises(ValueError, match="backend"):
            check_backend(name, torch.device("cpu"))
    packed, qs = bnbf.quantize_4bit(torch.randn(8, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        NF4Weight.from_bnb(packed, qs)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_fused_matches_reference(dtype: torch.dtype) -> None:
    from qlora_med.kernels.nf4_lora import nf4_dequantize

    g = torch.Generator().manual_seed(0)
    k, n, m, rank = 1024, 768, 515, 16
    w_full = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).cuda()
    packed, qs = bnbf.quantize_4bit(w_full, blocksize=64, compress_statistics=True, quant_type="nf4")
    weight = NF4Weight.from_bnb(packed, qs)
    ref_w = bnbf.dequantize_4bit(packed, qs)
    got_w = nf4_dequantize(weight, dtype)
    assert (got_w.float() - ref_w.float()).abs().max().item() <= 2 * torch.finfo(
        dtype
    ).eps * ref_w.abs().max().item()
    x = torch.randn(m, k, generator=g).to(dtype).cuda()
    lora_a = (torch.randn(rank, k, generator=g) / k**0.5).cuda()
    lora_b = (torch.randn(n, rank, generator=g) * 0.5).cuda()
    dy = torch.randn(m, n, generator=g).to(dtype).cuda()
    got = fwd_bwd(nf4_lora_linear, x, lora_a, lora_b, dy, weight=weight, backend="triton")
    ref = fwd_bwd(nf4_lora_reference, x, lora_a, lora_b, dy, weight=weight)
    for name, gt, r in zip(("y", "dx", "dA", "dB"), got, ref, strict=True):
        assert_close(gt, r, dtype, name)
