"""Prompt templates and label masking.

A conversation is rendered to one string while recording the character spans of the assistant
answers; the string is tokenized once (with offsets) and a token is a label exactly when it
overlaps an answer span. So masking cannot drift from how the text is tokenized at inference.

The image placeholder is moved to the front of the first question (``<image>\\n{question}``), as
LLaVA does for either placement in the LLaVA-Med data.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100

LLAVA_MED_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: the text and the (start, end) character spans that carry loss."""

    text: str
    answer_spans: list[tuple[int, int]]


class _Builder:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.spans: list[tuple[int, int]] = []
        self.length = 0

    def add(self, text: str, answer: bool = False) -> None:
        if answer:
            self.spans.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def done(self) -> Rendered:
        return Rendered("".join(self.parts), self.spans)


def place_image(question: str, image_token: str) -> str:
    """Move the image placeholder to the front: ``<image>\\n{question}``."""
    return f"{image_token}\n{question.replace(image_token, '').strip()}"


def render(
    template: str, turns: list[tuple[str, str | None]], image_token: str, bos: str = "<s>", eos: str = "</s>"
) -> Rendered:
    """Render (question, answer) rounds; a final answer of ``None`` leaves a generation prompt."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    turns = [(place_image(q, image_token) if i == 0 else q, a) for i, (q, a) in enumerate(turns)]
    b = _Builder()
    if template == "plain":
        # LLaVA stage-1 'plain': image, caption, newline; the instruction text is not shown.
        b.add(bos + image_token)
        if turns[0][1] is not None:
            b.add(turns[0][1].strip() + "\n", answer=True)
        return b.done()
    if template == "mistral_instruct":
        for q, a in turns:
            b.add(f"{bos}[INST] {q} [/INST]")
            if a is not None:
                b.add(f" {a.strip()}{eos}", answer=True)
        return b.done()
    if template == "vicuna_v1":
        b.add(f"{bos}{VICUNA_SYSTEM}")
        for q, a in turns:
            b.add(f" USER: {q} ASSISTANT:")
            if a is not None:
                b.add(f" {a.strip()}{eos}", answer=True)
        return b.done()
    # llava_med_v1: LLaVA-Med v1.0's '###' template
    b.add(f"{bos}{LLAVA_MED_V1_SYSTEM}\n")
    for i, (q, a) in enumerate(turns):
        b.add(f"### Human: {q}\n### Assistant:")
        if a is not None:
            last = i == len(turns) - 1
            b.add(f" {a.strip()}\n" + (eos if last else ""), answer=True)
    return b.done()


TEMPLATES = frozenset({"plain", "mistral_instruct", "vicuna_v1", "llava_med_v1"})


@dataclass
class Encoded:
    """Token ids and labels of one sample, image placeholder expanded."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode(
    tokenizer,
    rendered: Rendered,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
) -> Encoded:
    """Tokenize a rendered conversation, expand the image token and mask everything but answers.

    Truncation keeps the start (the image is at the front) and never cuts the image tokens:
    when ``max_length`` cannot hold them a ValueError says so.
    """
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = []
    labels: list[int] = []
    for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        if token_id == image_token_id:
            input_ids.extend([image_token_id] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
            continue
        is_answer = any(start < a_end and end > a_start for a_start, a_end in rendered.answer_spans)
        input_ids.append(token_id)
        labels.append(token_id if is_answer else IGNORE_INDEX)
    truncated = len(input_ids) > max_length
    if truncated:
        if image_token_id in input_ids:
            last_image = len(input_ids) - 1 - input_ids[::-1].index(image_token_id)
            if last_image >= max_length:
                raise ValueError(
                    f"max_length={max_length} cannot hold the {num_image_tokens} image tokens; "
                    f"raise max_length above {last_image + 1}"
                )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return Encoded(input_ids, labels, truncated)
