"""The ``chat_template`` template: a conversation rendered by the model's own chat template (transformers' Jinja
renderer, as ``processor.apply_chat_template`` renders it), with the assistant answers' character spans found.

Each answer is rendered as a unique sentinel, the sentinels are replaced by the answers and the result must equal
the template's rendering of the real conversation (a template that rewrites answers beyond trimming them is
refused), so any chat template works. An answer's span also covers the turn end that follows it (the family's
``turn_end``, e.g. ``<|im_end|>``, or EOS): the model learns to stop. The image the template writes
(``image_placeholder``) becomes the family's ``image_sequence`` with one image token, which the encoder expands
as the processor does.
"""

from __future__ import annotations

from dataclasses import dataclass

_SENTINEL = "\x00qlora-med-answer-{}\x00"
IMAGE_MARK = "<image>"  # where LLaVA-format data puts the image in a question


@dataclass(frozen=True)
class ChatFormat:
    """A model's chat template and how its images and turn ends appear in the rendered text."""

    jinja: str
    image_placeholder: str
    image_sequence: str  # "{image}" marks the one image token the encoder expands
    image_token: str
    turn_end: str = ""
    bos_token: str = ""
    eos_token: str = ""


def _messages(turns: list[tuple[str, str | None]], with_image: bool, answers: list[str]) -> list[dict]:
    messages, given = [], iter(answers)
    for i, (question, answer) in enumerate(turns):
        content = [{"type": "image"}] if i == 0 and with_image else []
        content.append({"type": "text", "text": question.replace(IMAGE_MARK, "").strip()})
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": next(given)}]})
    return messages


def _render(fmt: ChatFormat, messages: list[dict], generation: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        [messages], chat_template=fmt.jinja, add_generation_prompt=generation,
        bos_token=fmt.bos_token, eos_token=fmt.eos_token,
    )
    return rendered[0]


def render_chat(
    fmt: ChatFormat, turns: list[tuple[str, str | None]], with_image: bool
) -> tuple[str, list[tuple[int, int]]]:
    """The text of (question, answer) rounds rendered with the chat template (a final answer of ``None`` leaves
    the generation prompt) and the answers' character spans. ValueError when the template changes answers so
    that they cannot be found."""
    answers = [a for _, a in turns if a is not None]
    generation = turns[-1][1] is None
    marked = _render(fmt, _messages(turns, with_image, [_SENTINEL.format(k) for k in range(len(answers))]), generation)
    real = _render(fmt, _messages(turns, with_image, answers), generation)
    image_text = fmt.image_sequence.format(image=fmt.image_token)
    for written in (answers, [a.strip() for a in answers]):  # templates that `| trim` the content
        parts, spans, length, rest = [], [], 0, marked
        for k, answer in enumerate(written):
            before, _, rest = rest.partition(_SENTINEL.format(k))
            before = before.replace(fmt.image_placeholder, image_text) if with_image else before
            parts.append(before)
            length += len(before)
            end = length + len(answer)
            for closing in (fmt.turn_end, fmt.eos_token):
                if closing and rest.startswith(closing):
                    end += len(closing)
                    break
            spans.append((length, end))
            parts.append(answer)
            length += len(answer)
        parts.append(rest.replace(fmt.image_placeholder, image_text) if with_image else rest)
        text = "".join(parts)
        expected = real.replace(fmt.image_placeholder, image_text) if with_image else real
        if text == expected:
            return text, spans
    raise ValueError("the chat template rewrites the answers (beyond trimming them), so the kit cannot find "
                     "which tokens to train; use one of the kit's templates or a template that writes answers as given")
