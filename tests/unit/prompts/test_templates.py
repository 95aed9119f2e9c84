"""Templates and label masking with the real Mistral-v0.2 tokenizer."""

from __future__ import annotations

import pytest

from qlora_med.prompts.templates import IGNORE_INDEX, TEMPLATES, encode, render

ROUNDS = [
    ("Which side has the effusion?\n<image>", "The right side, with blunting of the costophrenic angle."),
    ("Is the heart enlarged?", "No, the cardiothoracic ratio is normal."),
    ("Any pneumothorax?", "None is seen."),
]


def _answer_spans(labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def _encode(processor, template, rounds, max_length=4096, n_image=16):
    tok = processor.tokenizer
    rendered = render(template, rounds, "<image>", tok.bos_token, tok.eos_token)
    return tok, encode(tok, rendered, tok.convert_tokens_to_ids("<image>"), n_image, max_length)


@pytest.mark.parametrize("template", sorted(TEMPLATES - {"plain"}))
def test_labels_decode_to_exactly_the_answers(processor, template):
    tok, enc = _encode(processor, template, ROUNDS)
    spans = _answer_spans(enc.labels)
    assert len(spans) == len(ROUNDS)
    for span, (_q, answer) in zip(spans, ROUNDS, strict=True):
        assert tok.decode(span, skip_special_tokens=True).strip() == answer
    # the end-of-answer token is trained on the last turn, so the model learns to stop
    assert spans[-1][-1] == tok.eos_token_id
    unmasked = {i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX}
    image_id = tok.convert_tokens_to_ids("<image>")
    assert not any(enc.input_ids[i] == image_id for i in unmasked)
    assert enc.input_ids.count(image_id) == 16
    assert enc.labels == [t if i in unmasked else IGNORE_INDEX for i, t in enumerate(enc.input_ids)]


def test_plain_template_trains_only_the_caption(processor):
    caption = "Coronal contrast CT through both kidneys."
    tok, enc = _encode(processor, "plain", [("Describe the figure.\n<image>", caption)])
    spans = _answer_spans(enc.labels)
    assert len(spans) == 1
    assert tok.decode(spans[0]).strip() == caption
    assert "Describe" not in tok.decode(enc.input_ids)  # plain drops the instruction, as in LLaVA


def test_image_moves_to_the_front_wherever_it_was(processor):
    tok = processor.tokenizer
    before = render("mistral_instruct", [("<image>\nWhat is it?", "A cell.")], "<image>")
    after = render("mistral_instruct", [("What is it?\n<image>", "A cell.")], "<image>")
    assert before.text == after.text == "<s>[INST] <image>\nWhat is it? [/INST] A cell.</s>"
    assert tok  # tokenizer fixture loaded


def test_truncation_keeps_image_tokens_and_is_reported(processor):
    _tok, enc = _encode(processor, "mistral_instruct", ROUNDS, max_length=40)
    assert enc.truncated and len(enc.input_ids) == 40
    assert enc.input_ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == 16


def test_max_length_too_small_for_the_image_is_an_error(processor):
    with pytest.raises(ValueError, match="cannot hold the 16 image tokens; raise max_length"):
        _encode(processor, "mistral_instruct", ROUNDS, max_length=10)


def test_generation_prompt_ends_where_the_answer_starts(processor):
    rendered = render("mistral_instruct", [("What is it?\n<image>", None)], "<image>")
    assert rendered.text.endswith("[/INST]") and rendered.answer_spans == []
