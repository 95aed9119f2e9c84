"""Templates and label masking with the real Mistral-v0.2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.legacy import load_records

from qlora_med.prompts.templates import IGNORE_INDEX, encode, render, tokenizer_mode
from qlora_med.prompts.templates import KIT_TEMPLATES as TEMPLATES
from qlora_med.prompts.tokenization import tokenize

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "sample"

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


# The templates whose labels are the answers (llava_med_v1 reproduces v1.0's own masks: test_original_formats).
SPAN_TEMPLATES = sorted(TEMPLATES - {"llava_med_v1"})


@pytest.mark.parametrize("template", sorted(TEMPLATES - {"plain", "llava_med_v1"}))
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


def _spec_encode(tok, rendered, image_id, n_image, max_length):
    """The masking rule written out token by token (what the vectorised ``encode`` must equal)."""
    token_ids, offsets, _ = tokenize(tok, [rendered.text], tokenizer_mode(rendered.template))
    ids, labels = [], []
    for token, (start, end) in zip(token_ids.tolist(), offsets.tolist(), strict=True):
        if token == image_id:
            ids += [image_id] * n_image
            labels += [IGNORE_INDEX] * n_image
            continue
        ids.append(token)
        labels.append(token if any(start < e and end > s for s, e in rendered.answer_spans) else IGNORE_INDEX)
    if image_id in ids[max_length:]:
        return (
            f"max_length={max_length} cannot hold the {n_image} image tokens; "
            f"raise max_length above {len(ids) - ids[::-1].index(image_id)}"
        )
    return ids[:max_length], labels[:max_length], len(ids) > max_length


@pytest.mark.parametrize("template", SPAN_TEMPLATES)
def test_encode_follows_the_masking_rule_token_by_token(processor, template):
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    conversations = [
        r.rounds
        for f in ("alignment", "instruct", "vqa_train")
        for r in load_records(SAMPLE / f"{f}.json", SAMPLE / "images")
    ]
    conversations += [[("<image>\nq", "ünïcödé ✓ 日本語 " * 5), ("follow  up\n", "  spaced  ")], ROUNDS]
    conversations += [[*c[:-1], (c[-1][0], None)] for c in conversations]  # generation prompts
    outcomes = set()
    for rounds in conversations:
        rendered = render(template, rounds, "<image>", tok.bos_token, tok.eos_token)
        for max_length in (12, 20, 40, 64, 2048):
            expected = _spec_encode(tok, rendered, image_id, 16, max_length)
            try:
                enc = encode(tok, rendered, image_id, 16, max_length)
            except ValueError as err:
                assert str(err) == expected, (template, rounds, max_length)
                outcomes.add("image cut")
                continue
            assert (enc.input_ids, enc.labels, enc.truncated) == expected, (template, rounds, max_length)
            outcomes.add("truncated" if enc.truncated else "whole")
    assert outcomes == {"image cut", "truncated", "whole"}


def test_a_batch_encodes_like_its_rows_one_by_one(processor):
    """Templates of one tokenizer mode may share a batch; v1.0's per-turn masks stay with their rows."""
    from qlora_med.prompts.templates import encode_batch

    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    rendered = [
        render(t, rounds, "<image>", tok.bos_token, tok.eos_token)
        for rounds in (ROUNDS, ROUNDS[:1], [(ROUNDS[0][0], None)])
        for t in sorted(TEMPLATES)
    ]
    batch = encode_batch(tok, rendered, image_id, 16, 60)
    ends = batch.lengths.cumsum()
    for r, (one, end) in enumerate(zip(rendered, ends, strict=True)):
        enc = encode(tok, one, image_id, 16, 60)
        rows = slice(int(end - batch.lengths[r]), int(end))
        assert (batch.input_ids[rows].tolist(), batch.labels[rows].tolist()) == (enc.input_ids, enc.labels)


def test_llava_med_v1_keeps_the_image_where_the_data_puts_it():
    after = render("llava_med_v1", [("What is it?\n<image>", "A cell.")], "<image>").text
    before = render("llava_med_v1", [("<image>\nWhat is it?", "A cell.")], "<image>").text
    missing = render("llava_med_v1", [("What is it?", None)], "<image>").text
    head = "<s>A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    head += "detailed, and polite answers to the human's questions.\n\n### Human: "
    assert after == head + "What is it?\n<image>\n### Assistant: A cell.\n### "
    assert before == head + "<image>\nWhat is it?\n### Assistant: A cell.\n### "
    assert (
        missing == head + "What is it?\n<image>\n### Assistant:"
    )  # generation prompt, v1.0's evaluation placement


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_generation_prompts_are_the_training_ids_up_to_each_answer(processor, template):
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    rounds = ROUNDS[:1] if template == "plain" else ROUNDS
    training = encode(
        tok, render(template, rounds, "<image>", tok.bos_token, tok.eos_token), image_id, 16, 4096
    )
    for k, (question, answer) in enumerate(rounds):
        prompt = render(template, [*rounds[:k], (question, None)], "<image>", tok.bos_token, tok.eos_token)
        ids = encode(tok, prompt, image_id, 16, 4096).input_ids
        assert training.input_ids[: len(ids)] == ids, (template, k)
        following = tok.decode(training.input_ids[len(ids) :], skip_special_tokens=True)
        assert following.strip().startswith(answer.split()[0]), (template, k)  # the answer comes next
