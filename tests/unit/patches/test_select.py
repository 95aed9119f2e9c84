"""The one kernel switch: what each ``auto`` resolves to on CPU and CUDA, the errors, and the logged path."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qlora_med.errors import ConfigError
from qlora_med.patches import select
from qlora_med.patches.padding_free import PACKED_SDPA

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_liger(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="qlora_med.patches.select"):
        assert select.resolve_liger("auto") is False
    assert "Liger kernels off (mode=auto, no CUDA" in caplog.text
    assert select.resolve_liger("off") is False
    with pytest.raises(ConfigError, match="liger mode 'on' needs a CUDA GPU"):
        select.resolve_liger("on")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select.resolve_liger("on") is True
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select.resolve_liger("auto") is True and select.resolve_liger("on") is True
    assert select.resolve_liger("off") is False
    with pytest.raises(ConfigError, match="liger mode must be one of"):
        select.resolve_liger("yes")


def test_nf4_lora_backend(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with caplog.at_level(logging.INFO, logger="qlora_med.patches.select"):
        assert select.resolve_nf4_lora("auto", CPU) == "torch"
    assert "fused NF4+LoRA torch (mode=auto, no CUDA" in caplog.text
    assert select.resolve_nf4_lora("on", CPU) == "torch"
    assert select.resolve_nf4_lora("auto", CUDA) == select.resolve_nf4_lora("on", CUDA) == "triton"
    assert select.resolve_nf4_lora("off", CPU) is None and select.resolve_nf4_lora("off", CUDA) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select.resolve_nf4_lora("auto", CPU) == "triton"


def test_loss_backend_and_chunk_size(caplog):
    assert select.resolve_loss("auto", CPU) == "chunked"
    assert select.resolve_loss("auto", CUDA) == "trl"
    assert [select.resolve_loss(m, CUDA) for m in ("chunked", "trl", "full")] == ["chunked", "trl", "full"]
    assert select.resolve_loss_backend(CPU) == "torch" and select.resolve_loss_backend(CUDA) == "liger"
    head = nn.Linear(4, 32064, bias=False)  # the tiny model's padded Mistral vocabulary
    model = nn.Module()
    model.get_output_embeddings = lambda: head
    with caplog.at_level(logging.INFO, logger="qlora_med.patches.select"):
        assert select.resolve_chunk_size(None, model) == 523  # 64 MiB of fp32 logits
        assert select.resolve_chunk_size(16, model) == 16
    assert "523 rows per chunk (~64 MiB of fp32 logits, vocab 32064)" in caplog.text
    assert "16 rows per chunk (kernels.chunk_size)" in caplog.text


def test_attention(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="qlora_med.patches.select"):
        assert select.resolve_attn_implementation("auto") == "sdpa"
    assert "attention: sdpa (no CUDA device)" in caplog.text
    assert select.resolve_attn_implementation("eager") == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        import flash_attn  # noqa: F401

        expected = "flash_attention_2"
    except ImportError:
        expected = "sdpa"
    assert select.resolve_attn_implementation("auto") == expected


def _with_attention(impl: str) -> nn.Module:
    model = nn.Module()
    text = SimpleNamespace(_attn_implementation=impl)
    model.config = SimpleNamespace(get_text_config=lambda: text)
    return model


def test_padding_free(caplog):
    assert select.resolve_padding_free(False, _with_attention("sdpa")) is None
    with caplog.at_level(logging.INFO, logger="qlora_med.patches.select"):
        assert select.resolve_padding_free(True, _with_attention("sdpa")) == "packed_sdpa"
        assert select.resolve_padding_free(True, _with_attention(PACKED_SDPA)) == "packed_sdpa"
        assert select.resolve_padding_free(True, _with_attention("flash_attention_2")) == "varlen"
        assert select.resolve_padding_free(True, _with_attention("eager")) == "mask"
    assert "one causal SDPA call per sample" in caplog.text
    assert "flash_attention_2 varlen attention" in caplog.text
    assert any(
        r.levelno == logging.WARNING and "block-diagonal mask" in r.getMessage() for r in caplog.records
    )
