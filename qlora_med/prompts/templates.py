"""Prompt templates and label masking: the one implementation of both, for training and inference.

Each template reproduces a published format byte for byte (:data:`TEMPLATE_SPECS`; README's template table):

* ``plain``: LLaVA-1.5 stage 1 (``conv_llava_plain`` + ``preprocess_plain``): ``<s><image>{caption}\\n``.
* ``mistral_instruct``: Mistral-7B-Instruct-v0.2's own format (mistral_common's v1 instruct tokenizer):
  ``<s>[INST] {q1} [/INST] {a1}</s>[INST] {q2} [/INST] {a2}</s>``, one BOS.
* ``llava_med_v15``: LLaVA-Med v1.5 training (``conv_mistral_instruct``, ``tokenizer_image_token``,
  ``preprocess_llama_2``): ``<s>[INST] {q1} [/INST] {a1} </s>[INST] {q2} [/INST] {a2} </s>``.
* ``vicuna_v1``: LLaVA-Med v1.5's ``conv_vicuna_v1`` + ``preprocess_v1``:
  ``<s>{system} USER: {q1} ASSISTANT: {a1}</s> USER: {q2} ASSISTANT: {a2}</s>`` (turns stripped).
* ``llava_med_v1``: LLaVA-Med v1.0.0 training (``preprocess``): ``<s>{system}\\n\\n### Human: {q1}\\n### Assistant:
  {a1}\\n...### `` with the image where the data puts it, no EOS, and v1.0's label arithmetic (below).

A conversation is rendered to one string while recording the character spans of the assistant answers; the
string is tokenized once (:mod:`qlora_med.prompts.tokenization`, in the template's SentencePiece mode: every
template uses legacy mode, as the originals did) and a token is a label exactly when it overlaps an answer span.
This gives the labels of the originals' per-round length arithmetic token for token (restated in
tests/helpers/original_formats.py; the tests compare): no Mistral vocabulary piece spans ``]▁`` or ``:▁`` or ends in
``▁``, so an answer always starts on a token boundary. They differ only where the original's round split fails
(a turn that itself contains ``[/INST] ``, `` ASSISTANT: `` or ``</s>``): LLaVA then ignores the whole sample
("tokenization mismatch"), the kit keeps its answers' labels. The exception is
``llava_med_v1``, whose v1.0 masking (``_mask_targets``) is length arithmetic with its own quirks (each turn
measured alone with its own BOS, so the masks drift one token per turn; the first two tokens of each human turn
and the closing ``### `` are trained): it is computed from the turns' standalone token counts, as v1.0 did. The
image token is expanded to ``num_image_tokens`` masked positions (image positions never carry loss), and
truncation to ``max_length`` keeps the start but reports image tokens it would cut.

Except in ``llava_med_v1``, the image placeholder is moved to the front of the first question
(``<image>\\n{question}``), as LLaVA's ``preprocess_multimodal`` does for either placement in the LLaVA-Med data.
``image_token=None`` renders a conversation without an image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qlora_med.prompts.chat_render import render_chat
from qlora_med.prompts.tokenization import LEGACY, NATIVE, TokenizerMode, announce, tokenize

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
class TemplateSpec:
    """What a template reproduces and the tokenizer mode it needs."""

    reproduces: str
    mode: TokenizerMode = LEGACY


TEMPLATE_SPECS: dict[str, TemplateSpec] = {
    "plain": TemplateSpec("LLaVA-1.5 / LLaVA-Med v1.5 stage 1: conv_llava_plain + preprocess_plain"),
    "mistral_instruct": TemplateSpec(
        "Mistral-7B-Instruct-v0.2's own format (mistral_common v1 instruct tokenizer)"
    ),
    "llava_med_v15": TemplateSpec(
        "LLaVA-Med v1.5: conv_mistral_instruct + tokenizer_image_token + preprocess_llama_2"
    ),
    "vicuna_v1": TemplateSpec("LLaVA-Med v1.5's conv_vicuna_v1 + preprocess_v1"),
    "llava_med_v1": TemplateSpec("LLaVA-Med v1.0.0 training: '###' conversation + preprocess/_mask_targets"),
    "chat_template": TemplateSpec(
        "the model's own chat template (processor.apply_chat_template), answers and their turn end trained "
        "(qlora_med.prompts.chat_render)", NATIVE,
    ),
}
TEMPLATES = frozenset(TEMPLATE_SPECS)
KIT_TEMPLATES = TEMPLATES - {"chat_template"}  # rendered by the kit itself (and written as Jinja for exports)


def tokenizer_mode(template: str) -> TokenizerMode:
    """The SentencePiece mode ``template``'s text is tokenized in (legacy for every template)."""
    if template not in TEMPLATE_SPECS:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATE_SPECS[template].mode


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: the text, the (start, end) character spans of the answers, and its template.

    ``segments`` (``llava_med_v1`` only): the system header and each turn as v1.0 measured them one by one for
    its masks, with whether the turn is human.
    """

    text: str
    answer_spans: list[tuple[int, int]]
    template: str
    segments: tuple[tuple[str, bool], ...] = ()


class _Builder:
    def __init__(self, template: str) -> None:
        self.template = template
        self.parts: list[str] = []
        self.spans: list[tuple[int, int]] = []
        self.length = 0

    def add(self, text: str, answer: bool = False) -> None:
        if answer:
            self.spans.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def done(self, segments: tuple[tuple[str, bool], ...] = ()) -> Rendered:
        return Rendered("".join(self.parts), self.spans, self.template, segments)


def place_image(question: str, image_token: str) -> str:
    """Move the image placeholder to the front: ``<image>\\n{question}``."""
    return f"{image_token}\n{question.replace(image_token, '').strip()}"


def _render_v1(turns: list[tuple[str, str | None]], image_token: str | None, bos: str) -> Rendered:
    """LLaVA-Med v1.0.0: header, ``### Human: {q}\\n`` / ``### Assistant: {a}\\n`` turns as written, then ``### ``."""
    b = _Builder("llava_med_v1")
    header = f"{LLAVA_MED_V1_SYSTEM}\n\n"
    b.add(bos + header)
    segments = [(header, False)]
    for i, (q, a) in enumerate(turns):
        if i == 0 and image_token is not None and image_token not in q:
            q = f"{q}\n{image_token}"  # no placeholder: after the question, as v1.0's evaluation put it
        human = f"### Human: {q}\n"
        b.add(human)
        segments.append((human, True))
        if a is None:
            b.add("### Assistant:")
            return b.done(tuple(segments))
        b.add("### Assistant:")
        b.add(f" {a}\n", answer=True)
        segments.append((f"### Assistant: {a}\n", False))
    b.add("### ")
    return b.done(tuple(segments))


def render(
    template: str,
    turns: list[tuple[str, str | None]],
    image_token: str | None,
    bos: str = "<s>",
    eos: str = "</s>",
    chat=None,
) -> Rendered:
    """Render (question, answer) rounds; a final answer of ``None`` leaves a generation prompt. ``chat_template``
    renders with ``chat`` (a :class:`qlora_med.prompts.chat_render.ChatFormat`)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    if template == "chat_template":
        if chat is None:
            raise ValueError("template chat_template needs the model's chat format (its processor's chat template)")
        return Rendered(*render_chat(chat, turns, image_token is not None), template)
    if template == "llava_med_v1":
        return _render_v1(turns, image_token, bos)
    if image_token is not None:
        turns = [(place_image(q, image_token) if i == 0 else q, a) for i, (q, a) in enumerate(turns)]
    b = _Builder(template)
    if template == "plain":
        # LLaVA stage-1 'plain': image, caption as written, newline; the instruction text is not shown.
        b.add(bos + (image_token or ""))
        if turns[0][1] is not None:
            b.add(turns[0][1] + "\n", answer=True)
        return b.done()
    if template == "vicuna_v1":  # LLaVA-Med's TWO style: every turn stripped, "</s> USER:" between rounds
        b.add(f"{bos}{VICUNA_SYSTEM}")
        for q, a in turns:
            b.add(f" USER: {q.strip()} ASSISTANT:")
            if a is not None:
                b.add(f" {a.strip()}{eos}", answer=True)
        return b.done()
    # mistral_instruct (Mistral's v1 format) and llava_med_v15 (LLAMA_2 style, sep2 "</s>" after a space)
    close = eos if template == "mistral_instruct" else f" {eos}"
    b.add(bos)
    for q, a in turns:
        b.add(f"[INST] {q} [/INST]")
        if a is not None:
            b.add(f" {a}{close}", answer=True)
    return b.done()


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


def _batch_mode(tokenizer, rendered: Sequence[Rendered]) -> TokenizerMode:
    modes = {tokenizer_mode(r.template) for r in rendered}
    if len(modes) > 1:
        raise ValueError("a batch mixes templates of different tokenizer modes; encode them separately")
    for template in {r.template for r in rendered}:
        announce(tokenizer, template, tokenizer_mode(template))
    return modes.pop() if modes else LEGACY


def _segment_labels(
    rendered: Sequence[Rendered],
    ids: np.ndarray,
    labels: np.ndarray,
    row_start: np.ndarray,
    num_tokens: np.ndarray,
    seg_lengths: np.ndarray,
    image_token_id: int,
) -> None:
    """v1.0's ``_mask_targets`` on the rows with segments, in place: mask the header, and each human turn but
    its first two tokens, stepping by each turn's standalone length (its BOS included)."""
    k = 0
    for r, x in enumerate(rendered):
        if not x.segments:
            continue
        lens = seg_lengths[k : k + len(x.segments)].tolist()
        k += len(x.segments)
        keep = np.ones(int(num_tokens[r]), dtype=bool)
        cur = lens[0]
        keep[:cur] = False
        for length, (_, human) in zip(lens[1:], x.segments[1:], strict=True):
            if human:
                keep[cur + 2 : cur + length] = False
            cur += length
        row = slice(int(row_start[r]), int(row_start[r] + num_tokens[r]))
        labels[row] = np.where(keep & (ids[row] != image_token_id), ids[row], IGNORE_INDEX)


def encode_batch(
    tokenizer,
    rendered: Sequence[Rendered],
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
) -> EncodedBatch:
    """Tokenize rendered conversations, expand the image token, mask everything but answers, truncate."""
    mode = _batch_mode(tokenizer, rendered)
    n = len(rendered)
    segments = [text for r in rendered for text, _ in r.segments]
    ids, offsets, counts = tokenize(tokenizer, [r.text for r in rendered] + segments, mode)
    split = int(counts[:n].sum())
    seg_ids, seg_counts = ids[split:], counts[n:]
    ids, offsets, counts = ids[:split], offsets[:split], counts[:n]
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
    if segments:  # each segment's length as v1.0 counted it: its tokens, images expanded, plus its own BOS
        seg_row = np.repeat(np.arange(len(seg_counts)), seg_counts)
        seg_images = np.bincount(seg_row[seg_ids == image_token_id], minlength=len(seg_counts))
        seg_lengths = seg_counts + seg_images * (num_image_tokens - 1) + 1
        _segment_labels(rendered, ids, labels, row_start, num_tokens, seg_lengths, image_token_id)
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
