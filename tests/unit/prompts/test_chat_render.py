"""Template ``chat_template``: the kit's ids equal the family processor's own for the same conversation and image,
and labels cover exactly the answers and their turn ends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qlora_med.config.schema import TinyModelConfig
from qlora_med.model.family import chat_format, family_of_dir, image_spec, load_processor
from qlora_med.model.tiny import build_tiny_model
from qlora_med.prompts.templates import IGNORE_INDEX, encode, render

ROOT = Path(__file__).resolve().parents[3]
RECORD = json.loads((ROOT / "data" / "sample" / "instruct.json").read_text())[0]  # two rounds, medical text
TURNS = [(RECORD["conversations"][i]["value"], RECORD["conversations"][i + 1]["value"]) for i in (0, 2)]
IMAGE = ROOT / "data" / "sample" / "images" / "retina.jpg"


@pytest.fixture(scope="module", params=["llava_next", "qwen2_5_vl", "gemma3"])
def model(request, tmp_path_factory):
    from transformers import AutoConfig

    folder = build_tiny_model(TinyModelConfig(family=request.param), tmp_path_factory.mktemp(request.param) / "m")
    processor = load_processor(folder, family_of_dir(folder))
    spec = image_spec(AutoConfig.from_pretrained(folder), processor)
    return request.param, processor, spec, chat_format(processor, spec)


def _messages(turns):
    messages = []
    for i, (q, a) in enumerate(turns):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": q.replace("<image>", "").strip()}]
        messages.append({"role": "user", "content": content})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return messages


def _processor_ids(processor, spec, turns, generation: bool) -> list[int]:
    """What the family's own processor gives: its chat template, then processor(text, images)."""
    text = processor.apply_chat_template(_messages(turns), tokenize=False, add_generation_prompt=generation)
    image = Image.open(IMAGE).convert("RGB")
    side = spec.side or image.width
    image = image.resize((side, side))
    if type(processor).__name__ != "ImageTextProcessor":
        return processor(text=[text], images=[image], add_special_tokens=False)["input_ids"][0]
    # Qwen without torchvision: its processor's expansion, restated (one <|image_pad|> per merged patch)
    grid = processor.image_processor([image], return_tensors="pt")["image_grid_thw"][0]
    n = int(grid.prod()) // processor.image_processor.merge_size**2
    return processor.tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * n), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("generation", [False, True])
def test_ids_equal_the_family_processor(model, generation):
    family, processor, spec, fmt = model
    turns = [*TURNS[:1], (TURNS[1][0], None)] if generation else TURNS
    tok = processor.tokenizer
    rendered = render("chat_template", turns, spec.token, tok.bos_token, tok.eos_token, fmt)
    ids = encode(tok, rendered, spec.image_token_id, spec.tokens, 10_000).input_ids
    assert ids == _processor_ids(processor, spec, turns, generation), family
    assert ids.count(spec.image_token_id) == spec.tokens


def test_labels_are_the_answers_and_their_turn_end(model):
    family, processor, spec, fmt = model
    tok = processor.tokenizer
    encoded = encode(tok, render("chat_template", TURNS, spec.token, tok.bos_token, tok.eos_token, fmt),
                     spec.image_token_id, spec.tokens, 10_000)
    labels = np.array(encoded.labels)
    trained = tok.decode(np.array(encoded.input_ids)[labels != IGNORE_INDEX].tolist())
    end = fmt.turn_end or tok.eos_token
    expected = "".join(f"{a}{end}" for _, a in TURNS)
    squeeze = lambda s: "".join(s.split())  # noqa: E731 - decoders differ in the spaces they put back
    assert squeeze(trained) == squeeze(expected), family
    assert spec.image_token_id not in np.array(encoded.input_ids)[labels != IGNORE_INDEX]


def test_a_template_that_rewrites_answers_is_refused(model):
    from dataclasses import replace

    _, processor, spec, fmt = model
    shouting = replace(fmt, jinja=fmt.jinja.replace("item['text']", "item['text'] | upper")
                       .replace("content['text']", "content['text'] | upper"))
    with pytest.raises(ValueError, match="rewrites the answers"):
        render("chat_template", TURNS, spec.token, "<s>", "</s>", shouting)
