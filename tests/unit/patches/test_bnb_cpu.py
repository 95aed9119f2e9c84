"""The AVX-512 CPU dequantize fix: bitsandbytes' 4-bit dequantize equals the flat-block formula that its
quantizer (and its CUDA and portable paths) use, for every shape, dtype and double quant."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from qlora_med.patches import bnb_cpu


def flat_block_dequant(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """Element i = code[nibble i] * absmax[i // blocksize] over the flattened weight (nibble 2j high)."""
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    numel = state.shape[0] * state.shape[1]
    byte = packed.reshape(-1).long()
    nibble = torch.stack([byte >> 4, byte & 0xF], 1).reshape(-1)[:numel]
    values = state.code.float()[nibble] * absmax.float()[torch.arange(numel) // state.blocksize]
    return values.reshape(state.shape).to(dtype)


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(130, 96), (16, 32), (65, 123), (64, 128), (33, 130)])
def test_dequantize_is_flat_blockwise(shape: tuple[int, int], dtype: torch.dtype, nested: bool) -> None:
    assert bnb_cpu.install() == bnb_cpu.needed()  # the conftest installed it where needed: idempotent
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    got = bnbf.dequantize_4bit(packed, state)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, flat_block_dequant(packed, state, dtype))


def test_affected_shapes() -> None:
    assert bnb_cpu.affected((130, 96), 64) and bnb_cpu.affected((4, 32), 64)
    assert not bnb_cpu.affected((4096, 4096), 64) and not bnb_cpu.affected((128,), 64)
