"""The tiny builders of the non-LLaVA families (qlora_med.model.tiny): each model reloads through the real
``from_pretrained`` path with NF4 on its language model only, its image-token count matches the family's own
processor, a real image trains (finite loss, gradient into the connector) and its chat template renders."""

from __future__ import annotations

from pathlib import Path

import pytest
import skimage
import torch

from qlora_med.config.families import FAMILIES
from qlora_med.config.schema import ModelConfig, TinyModelConfig
from qlora_med.data.images import load_image, mean_colour, to_square
from qlora_med.model.family import connector_parameters, image_spec, load_processor
from qlora_med.model.load import load_model
from qlora_med.model.tiny import build_tiny_model, qwen_tokenizer

IMAGE = Path(skimage.__file__).parent / "data" / "cell.png"  # 660x550 greyscale: padded to a square
CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Cells."}]}]
RENDERED = {
    "llava_next": "<s>[INST] <image>\nWhat is shown? [/INST] Cells.</s>",
    "qwen2_5_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                  "<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n"
                  "<|im_start|>assistant\nCells.<|im_end|>\n",
    "gemma3": "<s><start_of_turn>user\n<start_of_image>What is shown?<end_of_turn>\n"
              "<start_of_turn>model\nCells.<end_of_turn>\n",
}


@pytest.fixture(scope="module", params=sorted(RENDERED))
def built(request, tmp_path_factory):
    """(family, folder, model, processor): built once per module, loaded with the default NF4."""
    family = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp("tiny") / family.name
    build_tiny_model(TinyModelConfig(family=family.name), folder)
    model, processor = load_model(ModelConfig(name_or_path=str(folder)), folder, torch.float32)
    return family, folder, model, processor


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def _batch(family, model, processor) -> dict[str, torch.Tensor]:
    """A real image (padded to a square, resized to the spec's side) and a prompt, through the family's processor."""
    spec = image_spec(model.config, processor)
    image = to_square(load_image(IMAGE), "pad", mean_colour(processor.image_processor))
    if spec.side:
        image = image.resize((spec.side, spec.side))
    prompt = f"{family.placeholder}What is shown?"
    if family.name == "qwen2_5_vl":  # no Qwen2VLProcessor without torchvision: expand the image run here
        ip = processor.image_processor
        pixels = ip(images=[image], return_tensors="pt")
        n = int(pixels["image_grid_thw"].prod()) // ip.merge_size**2
        batch = dict(processor.tokenizer(prompt.replace(spec.token, spec.token * n), return_tensors="pt"))
        batch.update({k: pixels[k] for k in family.batch_keys})
    else:
        batch = dict(processor(text=prompt, images=[image], return_tensors="pt"))
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", *family.batch_keys)}
    if family.token_type_ids:
        batch["token_type_ids"] = (batch["input_ids"] == spec.image_token_id).long()
    return batch


def test_nf4_on_the_language_model_only(built):
    import bitsandbytes as bnb

    family, _, model, _ = built
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    llm = [n for n in linears if _under(n, family.language_model)]
    assert llm and all(isinstance(linears[n], bnb.nn.Linear4bit) for n in llm)
    kept = [n for n in linears if any(_under(n, p) for p in (family.vision_tower, *family.connector))]
    assert kept and not any(isinstance(linears[n], bnb.nn.Linear4bit) for n in kept)
    assert all(p.dtype == torch.float32 for p in connector_parameters(model, family).values())
    tower = model.get_submodule(family.vision_tower)
    assert not any(isinstance(p, bnb.nn.Params4bit) or not p.is_floating_point() for p in tower.parameters())


def test_image_spec_matches_the_family_processor(built):
    family, _, model, processor = built
    spec = image_spec(model.config, processor)
    assert spec.image_token_id == processor.tokenizer.convert_tokens_to_ids(family.image_token)
    ids = _batch(family, model, processor)["input_ids"]
    assert int((ids == spec.image_token_id).sum()) == spec.tokens
    expected = {"llava_next": 24, "qwen2_5_vl": 4, "gemma3": 4}[family.name]  # sizes the builders choose
    assert spec.tokens == expected


def test_forward_backward_on_a_real_image(built):
    family, _, model, processor = built
    batch = _batch(family, model, processor)
    spec = image_spec(model.config, processor)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == spec.image_token_id, -100)
    model.zero_grad()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in connector_parameters(model, family).values() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_chat_template_reloads_and_renders_the_image_placeholder(built):
    family, folder, _, _ = built
    processor = load_processor(folder, family)
    assert processor.chat_template
    text = processor.apply_chat_template(CHAT, tokenize=False)
    assert family.placeholder in text and family.turn_end in text
    assert text == RENDERED[family.name]


@pytest.mark.parametrize("built", ["gemma3"], indirect=True)
def test_gemma3_tokenizer_names_its_image_tokens(built):
    family, _, model, processor = built
    tok = processor.tokenizer
    names = (tok.boi_token, tok.eoi_token, tok.image_token)
    assert names == ("<start_of_image>", "<end_of_image>", family.image_token)
    assert (model.config.boi_token_index, model.config.eoi_token_index, model.config.image_token_index) == (
        tok.boi_token_id, tok.eoi_token_id, tok.image_token_id)


def test_qwen_tokenizer_is_deterministic_and_byte_level():
    first, second = qwen_tokenizer(), qwen_tokenizer()
    assert first.get_vocab() == second.get_vocab() and 1000 <= len(first) <= 2048
    text = "Nuclei ~12 µm; ΔT = 3 °C <|im_end|>"
    ids = first(text)["input_ids"]
    assert first.convert_tokens_to_ids("<|im_end|>") in ids
    assert first.decode(ids) == text
    assert first.eos_token == "<|im_end|>" and first.pad_token == "<|endoftext|>"
