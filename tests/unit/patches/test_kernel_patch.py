"""Kernel patches on model instances: same training with kernels on and off, undo, no leaks.

Tiny models are built in code, saved and loaded back through ``from_pretrained`` (the 4-bit one with
BitsAndBytesConfig: NF4, double quant, fp32 compute) with PEFT LoRA on all linears. Triton paths run in a
child pytest under TRITON_INTERPRET=1 (``test_triton_interpreter``); the rest in process.

Tolerances: per-step losses kernels on vs off within 1e-5 relative (fp32; observed ~1e-7), trained
LoRA weights within 1e-4 relative; undo restores bit-identical outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.triton_child import CHILD, child_only, run_children  # noqa: E402
from peft import LoraConfig, get_peft_model
from transformers import (
    BitsAndBytesConfig,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
)

from qlora_med.errors import ConfigError
from qlora_med.patches import bnb_cpu
from qlora_med.patches.chunked_loss import chunked_causal_lm_loss, patch_causal_lm_loss
from qlora_med.patches.liger import apply_liger_kernels, find_llm
from qlora_med.patches.nf4_lora import patch_nf4_lora
from qlora_med.patches.select import resolve_liger

VOCAB = 128


def test_triton_interpreter() -> None:
    """Run this file's ``test_child_*`` tests under ``TRITON_INTERPRET=1`` in a child process."""
    run_children(__file__)


def mistral_config() -> MistralConfig:
    return MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_mistral")
    torch.manual_seed(0)
    MistralForCausalLM(mistral_config()).save_pretrained(path)
    return path


def qlora_model(
    path: Path, compute_dtype: torch.dtype = torch.float32, dropout: float = 0.1
) -> torch.nn.Module:
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )  # fmt: skip
    model = MistralForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.float32)
    bnb_cpu.keep_training_numerics(model)  # as model.load does: eval runs the training forward
    torch.manual_seed(1)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    )
    with torch.no_grad():  # non-zero B so that step 1 already exercises the LoRA path
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft_model


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def train(model: torch.nn.Module, kernels: bool, make_batch: Callable = batch, steps: int = 3) -> list[float]:
    """AdamW steps from a fixed seed; ``kernels``: chunked loss (patch the NF4 layers beforehand)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(2)  # same dropout masks on and off
    losses = []
    for _ in range(steps):
        if kernels:
            loss = chunked_causal_lm_loss(model, make_batch(), chunk_size=5)
        else:
            loss = model(**make_batch()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def trained_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training(
    build: Callable[[], torch.nn.Module], backend: str, n_patched: int, make_batch: Callable = batch
) -> None:
    off_model = build()
    off = train(off_model, kernels=False, make_batch=make_batch)
    on_model = build()
    assert len(patch_nf4_lora(on_model, backend=backend)) == n_patched
    on = train(on_model, kernels=True, make_batch=make_batch)
    assert off[-1] < off[0]
    torch.testing.assert_close(torch.tensor(on), torch.tensor(off), rtol=1e-5, atol=0)
    ref = trained_params(off_model)
    for name, value in trained_params(on_model).items():
        torch.testing.assert_close(value, ref[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- NF4 + LoRA patch


def test_kernels_on_off_same_training_torch_backend(mistral_dir: Path) -> None:
    assert_same_training(lambda: qlora_model(mistral_dir), "torch", n_patched=14)  # 7 linears x 2 layers


@child_only
def test_child_kernels_on_off_same_training_triton(mistral_dir: Path) -> None:
    assert_same_training(lambda: qlora_model(mistral_dir), "triton", n_patched=14)


def test_undo_and_fallbacks_restore_original_behaviour(mistral_dir: Path) -> None:
    model = qlora_model(mistral_dir)
    model.eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with model.disable_adapter():
            base_before = model(input_ids=ids).logits
        handle = patch_nf4_lora(model, backend="torch")
        patched = model(input_ids=ids).logits
        with model.disable_adapter():  # disabled adapters: the patched forward falls back to PEFT's
            assert torch.equal(model(input_ids=ids).logits, base_before)
        handle.undo()
        after = model(input_ids=ids).logits
    torch.testing.assert_close(patched, before, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, before)
    assert not any("forward" in m.__dict__ for m in model.modules())
    handle.undo()  # idempotent


def test_fused_path_saves_less_for_backward(mistral_dir: Path) -> None:
    """bf16 compute, fp32 LoRA masters: PEFT keeps an fp32 copy of x; the fused function does not."""
    model = qlora_model(mistral_dir, compute_dtype=torch.bfloat16, dropout=0.0)
    module = model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(4, 50, 64, dtype=torch.bfloat16, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}

    def saved_bytes() -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x).float().sum().backward()
        return sum(seen.values())

    peft_bytes = saved_bytes()
    handle = patch_nf4_lora(model, backend="torch")
    fused_bytes = saved_bytes()
    handle.undo()
    assert fused_bytes * 4 < peft_bytes, (fused_bytes, peft_bytes)


# ----------------------------------------------------------------------------- chunked loss


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=8, projection_dim=16,
    )  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=mistral_config(), image_token_index=VOCAB - 1,
                         image_seq_length=4)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_llava")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    return path


def llava_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB - 1, (2, 14), generator=g)
    ids[:, 1:5] = VOCAB - 1  # 4 image tokens (2x2 patches, CLS dropped)
    labels = ids.clone()
    labels[:, :8] = -100  # image + prompt
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "labels": labels,
    }


def test_chunked_loss_matches_llava_loss(llava_dir: Path) -> None:
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32)
    assert find_llm(model) is model.model.language_model
    proj = model.model.multi_modal_projector.linear_1.weight
    for nib in (None, 9):
        ref = model(**llava_batch(), num_items_in_batch=nib).loss
        (ref_grad,) = torch.autograd.grad(ref, proj)
        got = chunked_causal_lm_loss(model, llava_batch(), num_items_in_batch=nib, chunk_size=3)
        (got_grad,) = torch.autograd.grad(got, proj)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(got_grad, ref_grad, rtol=1e-4, atol=1e-7)

    handle = patch_causal_lm_loss(model, chunk_size=3)
    out = model(**llava_batch())
    assert out.logits is None
    no_labels = {k: v for k, v in llava_batch().items() if k != "labels"}
    assert model(**no_labels).logits.shape == (2, 14, VOCAB)
    handle.undo()
    full = model(**llava_batch())
    assert full.logits is not None
    torch.testing.assert_close(out.loss, full.loss, rtol=1e-5, atol=0)


def test_qlora_llava_kernels_on_off_same_training(llava_dir: Path) -> None:
    """LLaVA-Med set-up: 4-bit LLM with LoRA, full-precision vision tower, trained projector."""

    def build() -> torch.nn.Module:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"],
        )  # fmt: skip
        model = LlavaForConditionalGeneration.from_pretrained(
            llava_dir, quantization_config=bnb, dtype=torch.float32
        )
        torch.manual_seed(1)
        lora = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.05, modules_to_save=["multi_modal_projector"],
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        )  # fmt: skip
        return get_peft_model(model, lora)

    assert_same_training(build, "torch", n_patched=14, make_batch=llava_batch)


def test_chunked_loss_rejects_lora_head(mistral_dir: Path) -> None:
    model = MistralForCausalLM.from_pretrained(mistral_dir)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="plain, unquantized nn.Linear"):
        chunked_causal_lm_loss(model, batch())


# ----------------------------------------------------------------------------- Liger


@pytest.mark.skipif(torch.cuda.is_available() or CHILD, reason="CPU-only behaviour")
def test_liger_modes_without_gpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="qlora_med.patches.select"):
        assert resolve_liger("auto") is False
    assert "no CUDA" in caplog.text
    assert resolve_liger("off") is False
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        resolve_liger("on")
    with pytest.raises(ConfigError, match="mode"):
        resolve_liger("yes")


def test_liger_required_without_supported_llm(caplog: pytest.LogCaptureFixture) -> None:
    """A model without a llama/mistral LLM: nothing patched (warned), or an error for ``liger: on``."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with caplog.at_level(logging.WARNING, logger="qlora_med.patches.liger"):
        assert len(apply_liger_kernels(model)) == 0
    assert "no supported LLM" in caplog.text
    with pytest.raises(ConfigError, match="liger mode 'on': no supported LLM"):
        apply_liger_kernels(model, required=True)


def test_liger_patches_one_instance_only(llava_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Liger's ops replaced by exact PyTorch twins that count calls: routing, no leak, undo."""
    from transformers.models.mistral import modeling_mistral

    import qlora_med.patches.liger as liger_mod

    calls = {"rms": 0, "swiglu": 0, "rope": 0}

    def rms(x, w, eps, casting_mode, in_place):  # noqa: ANN001, ANN202
        calls["rms"] += 1
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def swiglu(a, b):  # noqa: ANN001, ANN202
        calls["swiglu"] += 1
        return torch.nn.functional.silu(a) * b

    original_rope = modeling_mistral.apply_rotary_pos_emb

    def rope(q, k, cos, sin, unsqueeze_dim):  # noqa: ANN001, ANN202
        calls["rope"] += 1
        return original_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    monkeypatch.setattr(liger_mod, "_liger_ops", lambda: (rms, swiglu, rope))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    other = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    inputs = {k: v for k, v in llava_batch().items() if k != "labels"}
    with torch.no_grad():
        before = model(**inputs).logits
        assert resolve_liger("auto") is True  # "CUDA available"
        handle = apply_liger_kernels(model)
        assert sorted(set(handle.targets)) == sorted(handle.targets) and len(handle) == 5 + 2 + 2
        patched = model(**inputs).logits
        assert calls == {"rms": 5, "swiglu": 2, "rope": 2}
        assert torch.equal(other(**inputs).logits, before)  # the other instance: original ops
        assert calls == {"rms": 5, "swiglu": 2, "rope": 2}
        handle.undo()
        assert torch.equal(model(**inputs).logits, before)
    assert calls == {"rms": 5, "swiglu": 2, "rope": 2}
    torch.testing.assert_close(patched, before, rtol=1e-6, atol=1e-6)
    assert modeling_mistral.apply_rotary_pos_emb is original_rope
    assert not any("forward" in m.__dict__ for m in model.modules())


@child_only
def test_child_liger_rope_kernel_matches(mistral_dir: Path) -> None:
    """Liger's real Triton RoPE (the one of its three kernels that runs in the interpreter)."""
    model = MistralForCausalLM.from_pretrained(mistral_dir).eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert resolve_liger("on") is True  # the interpreter
        with apply_liger_kernels(model, required=True, rms_norm=False, swiglu=False) as handle:
            assert len(handle) == 2
            patched = model(input_ids=ids).logits
    torch.testing.assert_close(patched, before, rtol=1e-5, atol=1e-5)
