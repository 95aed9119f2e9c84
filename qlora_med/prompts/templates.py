"""Prompt templates and label masking: the one implementation of both, for training and inference.

A conversation is rendered to one string while recording the character spans of the assistant
answers; the string is tokenized once (with offsets) and a token is a label exactly when it
overlaps an answer span. So masking cannot drift from how the text is tokenized at inference.
The image token is expanded to ``num_image_tokens`` masked positions, and truncation to
``max_length`` keeps the start (the image is at the front) but never cuts image tokens.

:func:`encode_batch` applies that rule to a batch with one tokenizer call and numpy work (the data
layer packs its result into the Arrow cache and ``data check`` reports on it); :func:`encode` is its
single-record case (generation prompts).

The image placeholder is moved to the front of the first question (``<image>\\n{question}``), as
LLaVA does for either placement in the LLaVA-Med data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

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


@dataclass
class EncodedBatch:
    """Token ids and labels of a batch of samples, each truncated to ``max_length``, end to end.

    Row ``i`` is the next ``lengths[i]`` entries of ``input_ids`` / ``labels`` (int64).
    ``num_tokens`` is each row's length before truncation (image tokens included), ``answer_tokens``
    its labels within ``max_length``; ``image_cut`` maps the rows whose image tokens do not fit in
    ``max_length`` to the message saying so (their ids are truncated like the others).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    num_tokens: np.ndarray
    answer_tokens: np.ndarray
    image_cut: dict[int, str]


def _tokenize(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat token ids, flat (start, end) character offsets and per-text token counts."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        encs = backend.encode_batch(texts, add_special_tokens=False)  # what tokenizer(...) calls
        ids_rows, offset_rows = [e.ids for e in encs], [e.offsets for e in encs]
    else:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        ids_rows, offset_rows = enc["input_ids"], enc["offset_mapping"]
    counts = np.fromiter(map(len, ids_rows), dtype=np.int64, count=len(ids_rows))
    total = int(counts.sum())
    ids = np.fromiter(chain.from_iterable(ids_rows), dtype=np.int64, count=total)
    offsets = np.fromiter(
        chain.from_iterable(chain.from_iterable(offset_rows)), dtype=np.int64, count=2 * total
    )
    return ids, offsets.reshape(-1, 2), counts


def encode_batch(
    tokenizer,
    rendered: Sequence[Rendered],
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
) -> EncodedBatch:
    """Tokenize rendered conversations, expand the image token, mask everything but answers, truncate."""
    ids, offsets, counts = _tokenize(tokenizer, [r.text for r in rendered])
    n = len(rendered)
    # Put every text on one axis (a gap between texts) so all answer spans are sorted and disjoint.
    base = np.zeros(n, dtype=np.int64)
    np.cumsum([len(r.text) + 1 for r in rendered[:-1]], out=base[1:])
    spans = np.array(
        [(b + s, b + e) for b, r in zip(base.tolist(), rendered, strict=True) for s, e in r.answer_spans],
        dtype=np.int64,
    ).reshape(-1, 2)
    row = np.repeat(np.arange(n), counts)
    start, end = offsets[:, 0] + base[row], offsets[:, 1] + base[row]
    # a token overlaps an answer when the last span starting before its end ends after its start
    last = np.searchsorted(spans[:, 0], end, side="left") - 1
    answer = (
        (last >= 0) & (spans[np.maximum(last, 0), 1] > start) if len(spans) else np.zeros_like(start, bool)
    )
    image = ids == image_token_id
    labels = np.where(answer & ~image, ids, IGNORE_INDEX)
    repeats = np.where(image, num_image_tokens, 1)
    ids, labels, row = np.repeat(ids, repeats), np.repeat(labels, repeats), np.repeat(row, repeats)
    num_tokens = np.bincount(row, minlength=n)
    row_start = np.zeros(n, dtype=np.int64)
    np.cumsum(num_tokens[:-1], out=row_start[1:])
    position = np.arange(len(ids)) - row_start[row]
    inside = position < max_length
    image = ids == image_token_id
    last_image = np.full(n, -1, dtype=np.int64)
    np.maximum.at(last_image, row[image], position[image])
    image_cut = {
        r: f"max_length={max_length} cannot hold the {num_image_tokens} image tokens; "
        f"raise max_length above {last_image[r] + 1}"
        for r in np.flatnonzero(last_image >= max_length).tolist()
    }
    return EncodedBatch(
        input_ids=ids[inside],
        labels=labels[inside],
        lengths=np.minimum(num_tokens, max_length),
        num_tokens=num_tokens,
        answer_tokens=np.bincount(row[inside & (labels != IGNORE_INDEX)], minlength=n),
        image_cut=image_cut,
    )


def encode(
    tokenizer,
    rendered: Rendered,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
) -> Encoded:
    """:func:`encode_batch` of one conversation; a ValueError when ``max_length`` cannot hold the image tokens."""
    batch = encode_batch(tokenizer, [rendered], image_token_id, num_image_tokens, max_length)
    if batch.image_cut:
        raise ValueError(batch.image_cut[0])
    return Encoded(batch.input_ids.tolist(), batch.labels.tolist(), bool(batch.num_tokens[0] > max_length))
