"""Every template against the format it reproduces: text, token ids and labels, token for token.

The originals are restated in tests/helpers/original_formats.py (SentencePiece itself as the slow legacy
tokenizer; LLaVA / LLaVA-Med's rendering and masking arithmetic); Mistral's own format is checked against
``mistral_common``. A few expected id lists are written out literally, so a change in the helper shows too.
"""

from __future__ import annotations

from pathlib import Path

import mistral_common
import pytest
import sentencepiece as spm
from helpers import original_formats as original
from helpers.legacy import load_records
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest, InstructRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from qlora_med.prompts.templates import IGNORE_INDEX, encode, render

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "sample"
N_IMAGE = 4
IGN = IGNORE_INDEX

CONVERSATIONS = {
    "image first": [
        (
            "<image>\nIs there a pneumothorax in the left hemithorax?",
            "No pneumothorax is seen; the left lung is fully expanded.",
        ),
    ],
    "image after": [
        (
            "What does immunohistochemistry show?\n<image>",
            "Immunohistochemistry shows diffuse membranous CD20 positivity in the lymphoid infiltrate.",
        ),
    ],
    "three rounds": [
        (
            "Which side has the pleural effusion?\n<image>",
            "The right side, with blunting of the costophrenic angle.",
        ),
        (
            "Is the cardiomediastinal silhouette enlarged?",
            "No, the cardiothoracic ratio is within normal limits.",
        ),
        ("Any pneumoperitoneum under the hemidiaphragms?", "None is seen."),
    ],
    "spaces and newlines": [
        (
            "<image>\n  Describe  the   haematoxylin and eosin stain. ",
            "  Sheets of atypical cells;  mitoses are frequent.  ",
        ),
        ("\nAnd the Ki-67 index?", "\nAbout 40 %."),
    ],
    "unicode": [("<image>\nWhat is the lesion’s size – in cm²?", "About 2 × 3 cm² (ünïcödé ✓ 日本語).")],
}


@pytest.fixture(scope="module")
def tok(processor):
    return processor.tokenizer


@pytest.fixture(scope="module")
def image_id(tok):
    return tok.convert_tokens_to_ids("<image>")


@pytest.fixture(scope="module")
def slow(tok):
    sp = spm.SentencePieceProcessor(
        model_file=str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")
    )
    return original.SlowLegacyTokenizer(sp, tok.get_added_vocab())


def _ours(tok, template, rounds, image_id, max_length=1 << 20):
    rendered = render(template, rounds, "<image>", tok.bos_token, tok.eos_token)
    enc = encode(tok, rendered, image_id, N_IMAGE, max_length)
    return rendered.text, enc.input_ids, enc.labels


def _original(template, rounds, slow, image_id):
    """The original's prompt (BOS written out), ids and labels with the image expanded as the model does."""
    if template == "llava_med_v1":
        prompt, ids, labels = original.llava_med_v1(rounds, slow, image_id, N_IMAGE)
        return (
            "<s>" + prompt,
            ids,
            [IGN if t == image_id else label for t, label in zip(ids, labels, strict=True)],
        )
    prompt, ids, labels = getattr(original, template)(rounds, slow, image_id)
    return ("<s>" + prompt, *original.expand_image(ids, labels, image_id, N_IMAGE))


def _conversations():
    records = [
        r.rounds
        for f in ("alignment", "instruct", "vqa_train")
        for r in load_records(SAMPLE / f"{f}.json", SAMPLE / "images")
    ]
    return [*CONVERSATIONS.values(), *records]


@pytest.mark.parametrize("template", ["plain", "llava_med_v15", "vicuna_v1", "llava_med_v1"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_text_ids_and_labels_equal_the_original(tok, slow, image_id, template, name):
    rounds = CONVERSATIONS[name][:1] if template == "plain" else CONVERSATIONS[name]
    want = _original(template, rounds, slow, image_id)
    assert _ours(tok, template, rounds, image_id) == want
    assert any(label != IGN for label in want[2])  # nothing degenerate: the original trains something


@pytest.mark.parametrize("template", ["plain", "llava_med_v15", "vicuna_v1", "llava_med_v1"])
def test_sample_data_equals_the_original(tok, slow, image_id, template):
    for rounds in _conversations():
        rounds = rounds[:1] if template == "plain" else rounds
        assert _ours(tok, template, rounds, image_id) == _original(template, rounds, slow, image_id), rounds


@pytest.mark.parametrize("template", ["llava_med_v15", "llava_med_v1"])
def test_truncation_cuts_the_original_sequence(tok, slow, image_id, template):
    rounds = CONVERSATIONS["three rounds"]
    _, ids, labels = _original(template, rounds, slow, image_id)
    after_image = len(ids) - ids[::-1].index(image_id)
    for max_length in (after_image, after_image + 9, (after_image + len(ids)) // 2, len(ids) - 1):
        _, got_ids, got_labels = _ours(tok, template, rounds, image_id, max_length)
        assert (got_ids, got_labels) == (ids[:max_length], labels[:max_length])


@pytest.mark.parametrize(
    ("template", "prompt"), [("llava_med_v15", original.llama_2_prompt), ("vicuna_v1", original.two_prompt)]
)
def test_generation_prompts_equal_the_original(tok, slow, image_id, template, prompt):
    for rounds in CONVERSATIONS.values():
        rounds = [*rounds[:-1], (rounds[-1][0], None)]
        text = prompt(rounds)  # what LLaVA-Med's model_vqa / cli build: conv.append_message(roles[1], None)
        ids = original.tokenizer_image_token(text, slow, image_id)
        ids, _ = original.expand_image(ids, [IGN] * len(ids), image_id, N_IMAGE)
        got_text, got_ids, got_labels = _ours(tok, template, rounds, image_id)
        assert (got_text, got_ids) == ("<s>" + text, ids)
        last_eos = max((i for i, t in enumerate(got_ids) if t == tok.eos_token_id), default=-1)
        assert set(got_labels[last_eos + 1 :]) == {IGN}  # the question being asked trains nothing


def _mistral_messages(rounds):
    return [
        m for q, a in rounds for m in (UserMessage(content=q), *([AssistantMessage(content=a)] if a else []))
    ]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_mistral_instruct_equals_mistral_common(tok, image_id, name):
    mistral = MistralTokenizer.v1()  # Mistral-7B-Instruct-v0.1/v0.2's tokenizer and instruct format
    rounds = [
        (q.replace("<image>", "").strip() if i == 0 else q, a) for i, (q, a) in enumerate(CONVERSATIONS[name])
    ]
    request = InstructRequest(messages=_mistral_messages(rounds))
    want = mistral.instruct_tokenizer.encode_instruct(request).tokens
    rendered = render("mistral_instruct", rounds, None, tok.bos_token, tok.eos_token)
    enc = encode(tok, rendered, image_id, N_IMAGE, 1 << 20)
    assert enc.input_ids == want
    # the labels are each answer and its EOS, nothing else
    answers = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGN]
    sp = mistral.instruct_tokenizer.tokenizer
    assert answers == [t for _, a in rounds for t in sp.encode(a, bos=False, eos=True)]
    prompt = [*rounds[:-1], (rounds[-1][0], None)]
    want = mistral.encode_chat_completion(ChatCompletionRequest(messages=_mistral_messages(prompt))).tokens
    rendered = render("mistral_instruct", prompt, None, tok.bos_token, tok.eos_token)
    assert encode(tok, rendered, image_id, N_IMAGE, 1 << 20).input_ids == want


def test_mistral_instruct_places_the_image_as_llava_does(tok, slow, image_id):
    rounds = CONVERSATIONS["three rounds"]
    text = "".join(f"[INST] {original.image_first(q)} [/INST] {a}</s>" for q, a in rounds)
    ids = original.tokenizer_image_token(text, slow, image_id)
    ids, _ = original.expand_image(ids, [IGN] * len(ids), image_id, N_IMAGE)
    got_text, got_ids, _ = _ours(tok, "mistral_instruct", rounds, image_id)
    assert (got_text, got_ids) == ("<s>" + text, ids)


# Written out once and checked against the rules by hand (pieces in the comments; "|" where the labels start
# or stop), so that a change in the helper or in the tokenizer set-up cannot pass unnoticed. Image: one position.
# fmt: off
LITERAL = {
    # <s> ▁[ INST ] ▁ <image> ▁ <0x0A> Is ▁there ▁a ▁p neum oth or ax ? ▁[ / INST ] | ▁No . ▁ </s>
    "llava_med_v15": (
        [("Is there a pneumothorax?\n<image>", "No.")],
        [1, 733, 16289, 28793, 28705, 32000, 28705, 13, 2301, 736, 264, 284, 28051, 999, 271, 897, 28804, 733,
         28748, 16289, 28793, 1770, 28723, 28705, 2],
        21,
    ),
    # <s> ▁[ INST ] ▁ <image> ▁ <0x0A> Is ... ? ▁[ / INST ] | ▁No . </s> | ▁[ INST ] ▁Which ▁l obe ? ▁[ / INST ] |
    # ▁Left ▁upper . </s>
    "mistral_instruct": (
        [("<image>\nIs there a pneumothorax?", "No."), ("Which lobe?", "Left upper.")],
        [1, 733, 16289, 28793, 28705, 32000, 28705, 13, 2301, 736, 264, 284, 28051, 999, 271, 897, 28804, 733,
         28748, 16289, 28793, 1770, 28723, 2, 733, 16289, 28793, 9595, 305, 8898, 28804, 733, 28748, 16289, 28793,
         18365, 7280, 28723, 2],
        None,
    ),
    # <s> <image> | ▁Im mun oh ist oc hem istry ▁shows ▁CD 2 0 . <0x0A>
    "plain": (
        [("<image>\nDescribe.", "Immunohistochemistry shows CD20.")],
        [1, 32000, 2236, 9487, 1371, 392, 402, 6981, 4535, 4370, 8204, 28750, 28734, 28723, 13],
        2,
    ),
}
# fmt: on


@pytest.mark.parametrize("template", sorted(LITERAL))
def test_literal_ids(tok, slow, template):
    rounds, want_ids, first_label = LITERAL[template]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == 32000
    text = render(template, rounds, "<image>", tok.bos_token, tok.eos_token)
    enc = encode(tok, text, image_id, 1, 1 << 20)
    assert enc.input_ids == want_ids
    if first_label is not None:
        assert enc.labels == [IGN] * first_label + want_ids[first_label:]
    if template != "mistral_instruct":
        assert (
            original.tokenizer_image_token(_original(template, rounds, slow, image_id)[0][3:], slow, image_id)
            == want_ids
        )


def test_vicuna_rounds_after_the_first_start_with_a_lone_space_piece(tok, image_id):
    """LLaVA-Med writes '</s> USER:'; the slow tokenizer makes ' USER:' ▁ ▁US ER : (a transformers 5 folder: ▁US ER :)."""
    rounds = [("<image>\nIs there a pneumothorax?", "No."), ("Which lobe?", "Left upper.")]
    _, ids, labels = _ours(tok, "vicuna_v1", rounds, image_id)
    tail = ids[ids.index(tok.eos_token_id) :]
    # </s> ▁ ▁US ER : ▁Which ▁l obe ? ▁ASS IST ANT : | ▁Left ▁upper . </s>
    # fmt: off
    assert tail == [2, 28705, 2223, 725, 28747, 9595, 305, 8898, 28804, 8602, 8048, 12738, 28747, 18365, 7280, 28723, 2]
    # fmt: on
    assert labels[-4:] == [18365, 7280, 28723, 2] and labels[-5] == IGN


def test_the_one_departure_a_turn_holding_the_separator(tok, slow, image_id):
    """LLaVA's round split fails on a turn that contains its separator and ignores the sample; we keep the labels."""
    rounds = [("<image>\nWhat does '[/INST] ' mean here?", "A stray separator.")]
    _, ids, labels = _original("llava_med_v15", rounds, slow, image_id)
    _, got_ids, got_labels = _ours(tok, "llava_med_v15", rounds, image_id)
    assert got_ids == ids and set(labels) == {IGN}
    assert (
        tok.decode([t for t in got_labels if t != IGN], skip_special_tokens=True).strip()
        == "A stray separator."
    )
