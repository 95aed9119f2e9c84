"""bitsandbytes on AVX-512 CPUs computing what it computes in training and on a GPU.

Two CPU-only behaviours of bitsandbytes 0.49-0.50 break the kit's promise that training, evaluation and
the NF4-faithful merge compute one function; both are corrected here (measured on an AVX-512 BF16 EPYC).

**Dequantize.**
bitsandbytes 0.49-0.50's AVX-512 ``dequantize_4bit`` CPU kernel walks quantization blocks row by row, while
``quantize_4bit`` (and the CUDA, scalar and PyTorch paths) block the *flattened* weight. When the row length
is not a multiple of the block size (64 for NF4) the two disagree: on a 130 x 96 weight 90% of the values
come back with another block's scale (max error 0.21 where NF4's own is 0.05), so PEFT's ``Linear4bit``,
the fused NF4+LoRA kernel's torch backend and the NF4-faithful merge all see different weights than the
same model on a GPU. Every 7B LLM dimension is a multiple of 64; small models (tests, the demo) are not.
:func:`install` registers, once per process, a CPU kernel for ``bitsandbytes::dequantize_4bit`` that runs
bitsandbytes' own portable implementation for exactly those shapes on AVX-512 machines and bitsandbytes'
native kernel otherwise. Elsewhere (no AVX-512, no bitsandbytes) it does nothing. The kit installs it
before it quantizes or dequantizes (``model.load``, ``artifacts.merge``).

**Inference repacking.** On CPUs with AVX-512 BF16, ``Linear4bit.forward`` in eval mode without grad
rewrites its weight, once and in place, into a CPU layout served by a bf16 kernel: logits then differ from
the training forward (fp32 compute) by up to 0.05 on the tiny LLaVA, and rows shorter than a block fail
(``shape '[32, 0]' is invalid``). :func:`keep_training_numerics` switches that off for a model's 4-bit
layers, so ``eval``/``chat``/``serve`` run the forward training ran (slower on CPU, never different).
"""

from __future__ import annotations

import ctypes as ct
import logging
from collections.abc import Sequence
from math import prod

import torch

logger = logging.getLogger(__name__)

_NATIVE_SUFFIX = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_library: torch.library.Library | None = None  # keeps the registration alive


def affected(shape: Sequence[int], blocksize: int) -> bool:
    """Whether bitsandbytes' AVX-512 kernel mis-blocks a weight of ``shape``: rows not a multiple of the block."""
    return len(shape) >= 2 and shape[-1] % blocksize != 0


def needed() -> bool:
    """True on an AVX-512 CPU with bitsandbytes' native CPU library loaded (its kernel is the one used)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    try:
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    except ImportError:
        return False
    return not isinstance(lib, ErrorHandlerMockBNBNativeLibrary)


def _dequantize_4bit_cpu(
    A: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    from bitsandbytes.cextension import lib
    from bitsandbytes.functional import get_ptr

    if A.dtype != torch.uint8:
        A = A.view(torch.uint8)
    native = getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{_NATIVE_SUFFIX.get(dtype)}", None)
    # bitsandbytes' own fallbacks: odd rows, and blocks >= 2048 (its AVX-512 accuracy issue); ours: affected()
    if native is None or affected(shape, blocksize) or shape[-1] % 2 or blocksize >= 2048:
        code = _get_4bit_code(quant_type, A.device)
        return _dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)
    out = torch.empty(shape, dtype=dtype, device=A.device)
    m, n = prod(shape[:-1]), shape[-1]
    absmax = absmax.float().contiguous()
    native(
        get_ptr(A),
        get_ptr(absmax),
        get_ptr(out),
        ct.c_longlong(blocksize),
        ct.c_longlong(m),
        ct.c_longlong(n),
    )
    return out


def install() -> bool:
    """Register the corrected CPU kernel when :func:`needed`; idempotent. Returns whether it is in place."""
    global _library
    if _library is not None:
        return True
    if not needed():
        return False
    import warnings

    import bitsandbytes.backends.cpu.ops  # noqa: F401 - its registration must come first so ours replaces it

    library = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():  # "Overriding a previously registered kernel": the point
        warnings.simplefilter("ignore", UserWarning)
        library.impl("dequantize_4bit", _dequantize_4bit_cpu, "CPU")
    _library = library
    logger.info(
        "bitsandbytes: AVX-512 CPU NF4 dequantize replaced for rows not a multiple of the block size "
        "(its native kernel blocks them per row); see qlora_med.patches.bnb_cpu"
    )
    return True


def keep_training_numerics(model: torch.nn.Module) -> int:
    """Stop bitsandbytes' CPU inference repacking in every ``Linear4bit`` of ``model``; returns how many
    layers it would have repacked (0 without AVX-512 BF16)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    layers = [
        m
        for m in model.modules()
        if isinstance(m, Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False)
    ]
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    if layers:
        logger.info(
            "bitsandbytes: CPU bf16 inference repacking off for %d 4-bit layers (eval runs the training "
            "forward)",
            len(layers),
        )
    return len(layers)
