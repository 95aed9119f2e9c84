"""Padding-free batches: same loss as the padded batch, and no attention across packed samples.

Model: the session's tiny LLaVA (CLIP 2x32 @56 px -> 16 image tokens, Mistral 2x64 with 4 query / 2 key-value
heads, NF4 + LoRA, fp32 compute), LoRA B randomised so the adapters matter. Tolerances (fp32): packed vs padded
loss within 1e-5 relative, logits within 1e-4 absolute (observed ~1e-6: the same sums in a different order),
logits of untouched samples after perturbing another sample within 1e-5 absolute.
"""

from __future__ import annotations

import pytest
import torch
from helpers.legacy import real_tokens

from qlora_med.config.schema import LoraConfig, ModelConfig
from qlora_med.config.stages import TrainSpec
from qlora_med.data.packing import PaddingFreeCollator, pack_batch
from qlora_med.model.load import load_model
from qlora_med.patches.chunked_loss import chunked_causal_lm_loss
from qlora_med.patches.padding_free import PACKED_SDPA, enable_padding_free
from qlora_med.train.trainable import setup_trainable

LENGTHS = (40, 23, 31)
IMAGE_TOKENS = 16


def padded_batch(image_token: int, pad_id: int, lengths=LENGTHS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded LLaVA batch: BOS, image tokens, prompt (unlabelled), answer (labelled)."""
    g = torch.Generator().manual_seed(seed)
    b, width = len(lengths), max(lengths)
    ids = torch.full((b, width), pad_id)
    labels = torch.full((b, width), -100)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 30000, (n,), generator=g)
        ids[i, 0] = 1
        ids[i, 1 : 1 + IMAGE_TOKENS] = image_token
        labels[i, 20:n] = ids[i, 20:n]
        mask[i, :n] = 1
    pixels = torch.randn(b, 3, 56, 56, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


@pytest.fixture(scope="module")
def qlora_llava(tiny_dir):
    model, processor = load_model(
        ModelConfig(name_or_path=str(tiny_dir), compute_dtype="fp32"), tiny_dir, torch.float32
    )
    torch.manual_seed(0)
    model = setup_trainable(model, TrainSpec(), LoraConfig(dropout=0.0), None, False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    return model, processor


def test_pack_batch_layout():
    batch = padded_batch(image_token=99, pad_id=0)
    packed = pack_batch(batch)
    total = sum(LENGTHS)
    assert packed["input_ids"].shape == packed["labels"].shape == packed["position_ids"].shape == (1, total)
    assert "attention_mask" not in packed and packed["pixel_values"] is batch["pixel_values"]
    assert packed["cu_seq_lens_q"].tolist() == [0, 40, 63, 94] and packed["max_length_q"] == 40
    assert packed["position_ids"][0, 38:43].tolist() == [38, 39, 0, 1, 2]
    assert (packed["labels"][0, [0, 40, 63]] == -100).all()  # a sample's first token is never a target
    mask = batch["attention_mask"].bool()
    assert torch.equal(packed["input_ids"][0], batch["input_ids"][mask])
    assert (packed["labels"] != -100).sum() == (batch["labels"][:, 1:] != -100).sum()
    assert real_tokens(batch) == real_tokens(packed) == total
    wrapped = PaddingFreeCollator(lambda features: batch)
    assert wrapped([])["input_ids"].shape == (1, total)


def test_packed_loss_and_logits_match_padded(qlora_llava):
    model, processor = qlora_llava
    batch = padded_batch(model.config.image_token_index, processor.tokenizer.pad_token_id)
    packed = pack_batch(batch)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**batch, use_cache=False)
        # transformers' own path: sdpa over the row with the block-diagonal mask it derives from position_ids
        own = model(**packed, use_cache=False)
        with enable_padding_free(model) as handle:
            assert len(handle) == 1 and model.config.text_config._attn_implementation == PACKED_SDPA
            ours = model(**packed, use_cache=False)
            chunked = chunked_causal_lm_loss(model, packed)
        assert model.config.text_config._attn_implementation == "sdpa"
    for out in (own, ours):
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(out.logits[0], ref.logits[mask], rtol=0, atol=1e-4)
    torch.testing.assert_close(chunked, ref.loss, rtol=1e-5, atol=0)


def test_packed_gradients_match_padded(qlora_llava):
    model, processor = qlora_llava
    batch = padded_batch(model.config.image_token_index, processor.tokenizer.pad_token_id, seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = torch.autograd.grad(model(**batch, use_cache=False).loss, params)
    with enable_padding_free(model):
        got = torch.autograd.grad(model(**pack_batch(batch), use_cache=False).loss, params)
    for g_ref, g_got in zip(ref, got, strict=True):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attention", ["packed_sdpa", "transformers_sdpa"])
def test_no_attention_across_samples(qlora_llava, attention):
    """Change the middle sample's text and image: the other samples' logits stay the same."""
    model, processor = qlora_llava
    batch = padded_batch(model.config.image_token_index, processor.tokenizer.pad_token_id)
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][1, 18:23] = torch.tensor([101, 202, 303, 404, 505])
    other["pixel_values"][1] = torch.randn(3, 56, 56)
    bounds = pack_batch(batch)["cu_seq_lens_q"].tolist()
    with torch.no_grad(), enable_padding_free(model) as handle:
        if attention == "transformers_sdpa":
            handle.undo()
        before = model(**pack_batch(batch), use_cache=False).logits[0]
        after = model(**pack_batch(other), use_cache=False).logits[0]
    first, middle, last = (slice(s, e) for s, e in zip(bounds[:-1], bounds[1:], strict=True))
    torch.testing.assert_close(after[first], before[first], rtol=0, atol=1e-5)
    torch.testing.assert_close(after[last], before[last], rtol=0, atol=1e-5)
    assert (after[middle] - before[middle]).abs().max() > 1e-2  # the perturbation did reach its own sample
