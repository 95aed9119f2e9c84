"""Chunked linear cross-entropy vs ``F.cross_entropy(h @ W.T, ...)``, forward and backward.

The torch backend runs in process. Liger's Triton backend runs on CPU only in the Triton interpreter,
so ``test_child_*`` tests run in a child pytest with TRITON_INTERPRET=1 (see ``test_triton_interpreter``).

Tolerances: loss |got - ref| <= 1e-5 * |ref| (fp32), 2e-3 * |ref| (bf16); gradients max |got - ref|
<= 1e-5 * max |ref| (fp32), 2e-2 * max |ref| (bf16: the per-token gradient p - y is rounded to bf16
before the matmuls in both paths, but summed in a different order).
"""

from __future__ import annotations

import pytest
import torch
from helpers.triton_child import child_only, run_children  # noqa: E402
from qlora_med.kernels.linear_ce import (
    CHUNK_BYTES,
    ChunkedLinearCEFunction,
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from torch.utils._python_dispatch import TorchDispatchMode

LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def test_triton_interpreter() -> None:
    """Run this file's ``test_child_*`` tests under ``TRITON_INTERPRET=1`` in a child process."""
    run_children(__file__)


def make_case(
    dtype: torch.dtype, bias: bool, shape: tuple[int, ...] = (2, 9), hidden: int = 48, vocab: int = 301
):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(*shape, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.2).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.2).to(dtype) if bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[::3] = -100  # image / prompt positions
    labels.view(-1)[1] = -100
    return h, w, b, labels


def loss_and_grads(fn, h, w, b, labels, **kw) -> list[torch.Tensor]:  # noqa: ANN001
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b) if t is not None]
    loss = fn(*leaves[:2], labels, leaves[2] if b is not None else None, **kw)
    (loss * 1.7).backward()  # a non-unit incoming gradient
    return [loss.detach()] + [t.grad for t in leaves]


def check(got: list[torch.Tensor], ref: list[torch.Tensor], dtype: torch.dtype) -> None:
    assert got[0].dtype == torch.float32
    loss_err = abs(got[0].item() - ref[0].item())
    assert loss_err <= LOSS_TOL[dtype] * abs(ref[0].item()), f"loss {got[0].item()} vs {ref[0].item()}"
    for i, (g, r) in enumerate(zip(got[1:], ref[1:], strict=True)):
        assert g.dtype == r.dtype
        err, scale = (g.float() - r.float()).abs().max().item(), r.float().abs().max().item()
        assert err <= GRAD_TOL[dtype] * scale, f"grad {i}: {err:.3g} > {GRAD_TOL[dtype]} * {scale:.3g}"


# ----------------------------------------------------------------------------- torch backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("reduction", "num_items"), [("mean", None), ("sum", None), ("mean", 7), ("mean", torch.tensor(11))]
)
@pytest.mark.parametrize(("bias", "chunk"), [(False, 4), (True, 1), (True, 1000)])
def test_matches_reference(
    dtype: torch.dtype, reduction: str, num_items: object, bias: bool, chunk: int
) -> None:
    h, w, b, labels = make_case(dtype, bias)
    kw = {"reduction": reduction, "num_items_in_batch": num_items}
    got = loss_and_grads(linear_cross_entropy, h, w, b, labels, chunk_size=chunk, backend="torch", **kw)
    check(got, loss_and_grads(linear_cross_entropy_reference, h, w, b, labels, **kw), dtype)


def test_no_labelled_token_gives_zero_loss_and_grads() -> None:
    h, w, _, labels = make_case(torch.float32, bias=False)
    got = loss_and_grads(linear_cross_entropy, h, w, None, torch.full_like(labels, -100), backend="torch")
    assert got[0].item() == 0.0 and not got[1].any() and not got[2].any()


def test_frozen_head_and_accumulation_match_full_batch() -> None:
    """Two micro-batches normalised by the total token count give the full batch's mean gradient."""
    h, w, _, labels = make_case(torch.float32, bias=False, shape=(4, 9))
    n_items = int((labels != -100).sum())
    full = h.clone().requires_grad_()
    linear_cross_entropy(full, w, labels, backend="torch").backward()
    parts = h.clone().requires_grad_()
    total = sum(
        linear_cross_entropy(
            parts[i : i + 2], w, labels[i : i + 2], num_items_in_batch=n_items, backend="torch"
        )
        for i in (0, 2)
    )
    total.backward()
    torch.testing.assert_close(parts.grad, full.grad, rtol=1e-5, atol=1e-7)
    assert w.grad is None  # frozen head: no [V, H] gradient buffer


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_never_materialises_full_logits() -> None:
    h, w, _, labels = make_case(torch.float32, bias=False, shape=(4, 40), hidden=16, vocab=1000)
    h.requires_grad_()
    w.requires_grad_()
    with _MaxNumel() as probe:
        linear_cross_entropy(h, w, labels, chunk_size=8, backend="torch").backward()
    n_labelled = int((labels != -100).sum())
    assert probe.max_numel <= max(8 * 1000, w.numel())  # one chunk of logits, or the weight's gradient
    assert probe.max_numel < n_labelled * 1000
    with _MaxNumel() as probe_ref:
        linear_cross_entropy_reference(h, w, labels).backward()
    assert probe_ref.max_numel >= 160 * 1000


def test_rejects_bad_arguments() -> None:
    h, w, _, labels = make_case(torch.float32, bias=False)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, labels, reduction="none")
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, labels[:, :-1])
    with pytest.raises(ValueError, match="backend"):  # "auto" is resolved by qlora_med.patches.select
        linear_cross_entropy(h, w, labels, backend="auto")


def test_default_chunk_is_64_mib_of_fp32_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CHUNK_BYTES == 64 * 2**20
    assert default_chunk_size(32064) == 523  # the tiny model's padded Mistral vocabulary
    assert default_chunk_size(2**20) == 64  # at least 64 rows
    h, w, _, labels = make_case(torch.float32, bias=False)
    seen = []
    apply = ChunkedLinearCEFunction.apply
    monkeypatch.setattr(ChunkedLinearCEFunction, "apply", lambda *a: seen.append(a[-1]) or apply(*a))
    linear_cross_entropy(h, w, labels)  # no chunk_size: the default for this vocabulary
    assert seen == [default_chunk_size(w.shape[0])]


# ----------------------------------------------------------------------------- Liger (Triton)


@child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("reduction", "num_items"), [("mean", None), ("sum", None), ("mean", 7)])
def test_child_liger_backend_matches_reference(
    dtype: torch.dtype, reduction: str, num_items: int | None
) -> None:
    h, w, _, labels = make_case(dtype, bias=False)
    kw = {"reduction": reduction, "num_items_in_batch": num_items}
    got = loss_and_grads(linear_cross_entropy, h, w, None, labels, backend="liger", **kw)
    check(got, loss_and_grads(linear_cross_entropy_reference, h, w, None, labels, **kw), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_liger_backend_matches_reference() -> None:
    h, w, _, labels = make_case(torch.bfloat16, bias=False, shape=(4, 512), hidden=256, vocab=32000)
    h, w, labels = h.cuda(), w.cuda(), labels.cuda()
    got = loss_and_grads(linear_cross_entropy, h, w, None, labels, backend="liger", num_items_in_batch=900)
    check(
        got,
        loss_and_grads(linear_cross_entropy_reference, h, w, None, labels, num_items_in_batch=900),
        torch.bfloat16,
    )
