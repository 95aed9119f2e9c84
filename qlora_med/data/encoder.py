"""A batch of records as the cache's Arrow rows: rendered and masked by the prompts layer, unusable ones named.

The masking rule is :func:`qlora_med.prompts.templates.encode_batch`; this module renders a batch with
the stage's template, encodes it, and packs the usable samples into Arrow list columns (:data:`SCHEMA`).
A sample is unusable when ``max_length`` cannot hold its image tokens (:data:`IMAGE_CUT`) or leaves no
answer token (:data:`NO_ANSWER`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from qlora_med.prompts.chat_render import ChatFormat
from qlora_med.prompts.templates import encode_batch, render, tokenizer_mode
from qlora_med.prompts.tokenization import announce

# Why a sample cannot be used (counted, or raised by the caller).
NO_ANSWER = "no_answer_tokens_after_truncation"
IMAGE_CUT = "image_tokens_do_not_fit"

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("num_tokens", pa.int32()),  # length before truncation, image tokens included
    ]
)
# Sources with embedded images (parquet, Hub datasets) also carry the encoded image: ``image`` is then its name.
EMBEDDED_SCHEMA = SCHEMA.append(pa.field("image_bytes", pa.large_binary()))


@dataclass(frozen=True)
class EncodeSpec:
    """Everything besides the tokenizer that decides a sample's tokens (part of the cache key)."""

    template: str
    num_image_tokens: int
    max_length: int
    image_token: str = "<image>"
    chat: ChatFormat | None = None  # the model's chat template (template chat_template)


@dataclass
class EncodedRows:
    """A batch's samples: ``num_tokens`` for every row; ids and labels for the rows in ``keep``.

    ``problems`` maps the other rows' indices to (reason, message).
    """

    num_tokens: np.ndarray
    keep: np.ndarray
    input_ids: pa.ListArray
    labels: pa.ListArray
    problems: dict[int, tuple[str, str]] = field(default_factory=dict)


def _list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32, copy=False)))


class BatchEncoder:
    """Renders and encodes batches of conversations into Arrow rows."""

    def __init__(self, tokenizer, spec: EncodeSpec) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.image_token_id = tokenizer.convert_tokens_to_ids(spec.image_token)
        announce(tokenizer, spec.template, tokenizer_mode(spec.template))  # log the tokenizer mode

    def encode(self, rounds: list[list[tuple[str, str]]]) -> EncodedRows:
        """Encode each conversation (a list of (question, answer) rounds)."""
        tok, spec = self.tokenizer, self.spec
        rendered = [render(spec.template, r, spec.image_token, tok.bos_token, tok.eos_token, spec.chat)
                    for r in rounds]
        batch = encode_batch(tok, rendered, self.image_token_id, spec.num_image_tokens, spec.max_length)
        problems = {r: (IMAGE_CUT, message) for r, message in batch.image_cut.items()}
        for r in np.flatnonzero(batch.answer_tokens == 0).tolist():
            problems.setdefault(r, (NO_ANSWER, f"no answer token within max_length={spec.max_length}"))
        kept_row = np.ones(len(rendered), dtype=bool)
        kept_row[list(problems)] = False
        take = np.repeat(kept_row, batch.lengths)
        lengths = batch.lengths[kept_row]
        return EncodedRows(
            num_tokens=batch.num_tokens, keep=np.flatnonzero(kept_row),
            input_ids=_list_array(batch.input_ids[take], lengths), labels=_list_array(batch.labels[take], lengths),
            problems=problems,
        )
