"""The exported Jinja chat templates give the text ``render`` gives, for every template."""

from __future__ import annotations

import copy

import pytest

from qlora_med.prompts.chat_template import chat_template, set_chat_template
from qlora_med.prompts.templates import KIT_TEMPLATES as TEMPLATES
from qlora_med.prompts.templates import render

CONVERSATIONS = [
    [("What is this?<image>", "A CT scan. "), ("Where is the lesion?", None)],
    [("<image>\n Describe the figure", "  Lungs."), ("  And the heart? ", "Normal.\n")],
    [
        ("Is there a pneumothorax in the left hemithorax?\n<image>", "No."),
        ("Which lobe?", "Left upper."),
        ("Immunohistochemistry?", None),
    ],
    [("Is there an effusion?", None)],
]


def _messages(turns, inline: bool):
    """Chat messages of ``turns``: the image as a content part (``inline``: as the text's placeholder)."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        if inline:
            content = [{"type": "text", "text": question}]
        else:
            text = {"type": "text", "text": question.replace("<image>", "")}
            content = [{"type": "image"}, text] if i == 0 else [text]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.fixture(scope="module")
def processors(processor):
    out = {}
    for template in TEMPLATES:
        out[template] = copy.deepcopy(processor)  # the fixture is shared
        set_chat_template(out[template], template, "<image>")
    return out


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_chat_template_reproduces_render(processors, template):
    processor = processors[template]
    tok = processor.tokenizer
    for turns in CONVERSATIONS[:2] if template == "plain" else CONVERSATIONS:
        if template == "plain":
            turns = [(turns[0][0], turns[0][1])]
        for inline in (False, True) if "<image>" in turns[0][0] else (False,):
            got = processor.apply_chat_template(
                _messages(turns, inline), add_generation_prompt=True, tokenize=False
            )
            # an image part carries no position: render sees the question without a placeholder then
            rounds = turns if inline else [(q.replace("<image>", ""), a) for q, a in turns]
            assert got == render(template, rounds, "<image>", tok.bos_token, tok.eos_token).text, (
                turns,
                inline,
            )


def test_a_first_message_without_an_image_gets_no_placeholder(processors):
    for template, processor in processors.items():
        got = processor.apply_chat_template(_messages([("Is it?", None)], inline=True), tokenize=False)
        assert "<image>" not in got or template == "plain"


def test_system_messages_are_ignored_and_strings_work(processors):
    processor = processors["llava_med_v15"]
    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A cell."},
    ]
    got = processor.apply_chat_template(messages, tokenize=False)
    assert got == "<s>[INST] <image>\nWhat is it? [/INST] A cell. </s>"


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown template"):
        chat_template("chatml")
