"""Rendered prompt text to token ids, tokenized the way the original trainings tokenized it.

LLaVA and LLaVA-Med v1.5 tokenized with the slow SentencePiece ``LlamaTokenizer`` of transformers 4.36 in
``legacy=True`` mode, Mistral's own reference (``mistral_common``) with SentencePiece itself. A transformers 5
tokenizer loaded from a folder gives other ids for the same text in two ways, and which ones depends on how the
folder was saved (its tokenizer.json pipeline, its ``legacy`` flag):

* **Dummy prefix.** SentencePiece starts every text it encodes with ``▁``. Legacy mode encodes each piece between
  two added tokens on its own, so every piece gets one (``</s>[INST]`` -> ``</s> ▁[``, ``<s>[INST]`` -> ``<s> ▁[``,
  ``<image>\\n`` -> ``<image> ▁ <0x0A>``); non-legacy mode gives it to the start of the text only.
* **Merge priorities.** SentencePiece merges by piece score, and the whitespace-run pieces of the Llama/Mistral
  models (``▁▁``, ``▁▁▁▁``, ...) score -1e9, so they merge last; a converted tokenizer.json ranks their merges
  first, so runs of spaces split differently (``x  USER``: ``▁x ▁▁ USER`` instead of SentencePiece's
  ``▁x ▁ ▁US ER``).

So the kit never tokenizes prompts with ``tokenizer(text)``. Each template names its mode
(:func:`qlora_med.prompts.templates.tokenizer_mode`), and :func:`tokenize` encodes with a private copy of the
tokenizer's backend whose pipeline is set explicitly: for ``legacy`` the normalizer ``Prepend("▁") + Replace(" ",
"▁")`` (applied to every piece between added tokens, as SentencePiece's dummy prefix) and no pre-tokenizer; for
non-legacy a ``Metaspace`` pre-tokenizer that prefixes the first piece only; in both the merges that build
whitespace runs ranked last, as SentencePiece scores them. The tokenizer itself is not changed. A tokenizer that
is not SentencePiece-BPE (byte-level BPE, WordPiece, ...) has no dummy prefix: its backend is used as it is.
"""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

logger = logging.getLogger(__name__)

SPIECE = "▁"


@dataclass(frozen=True)
class TokenizerMode:
    """How a template's text is tokenized by a SentencePiece tokenizer."""

    legacy: bool  # dummy prefix on every piece between added tokens (slow LlamaTokenizer legacy=True)
    native: bool = False  # the tokenizer's own pipeline, as processor(text) uses it (chat templates)

    @property
    def name(self) -> str:
        if self.native:
            return "native"
        return "sentencepiece_legacy" if self.legacy else "sentencepiece"

    def describe(self) -> str:
        if self.native:
            return "the tokenizer's own pipeline, as the model's processor tokenizes its chat template's text"
        if self.legacy:
            return (
                "SentencePiece legacy mode: every text piece between added tokens encoded on its own, with its "
                "dummy prefix '▁' (the slow LlamaTokenizer with legacy=True, mistral_common), SentencePiece's "
                "merge order"
            )
        return "SentencePiece non-legacy mode: dummy prefix '▁' at the start of the text only, SentencePiece's merge order"


LEGACY = TokenizerMode(legacy=True)
NON_LEGACY = TokenizerMode(legacy=False)
NATIVE = TokenizerMode(legacy=False, native=True)


@dataclass
class _Prepared:
    """A tokenizer's private backends (one per mode) and what was found out about it."""

    size: int
    sentencepiece: bool
    state: dict | None = None  # the backend's JSON state (SentencePiece tokenizers only)
    moved: int = 0  # whitespace-run merges ranked last
    backends: dict[bool, object] = field(default_factory=dict)
    announced: set[str] = field(default_factory=set)


_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_prepend_normalizer(normalizer: dict | None) -> bool:
    """True for Llama's old ``Sequence[Prepend("▁"), Replace(" ", "▁")]`` normalizer."""
    if not normalizer or normalizer.get("type") != "Sequence":
        return False
    kinds = [(n.get("type"), n.get("prepend", n.get("content"))) for n in normalizer.get("normalizers", [])]
    return kinds == [("Prepend", SPIECE), ("Replace", SPIECE)]


def _is_sentencepiece(state: dict) -> bool:
    model, pre, norm = state.get("model") or {}, state.get("pre_tokenizer"), state.get("normalizer")
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    metaspace = bool(pre) and pre.get("type") == "Metaspace" and pre.get("replacement") == SPIECE
    if metaspace and norm is None:
        return True
    return pre is None and _is_prepend_normalizer(norm)


def _merge_pair(merge) -> tuple[str, str]:
    return tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ", 1))


def _spm_merge_order(model: dict) -> int:
    """Rank the merges that build pure whitespace runs last (SentencePiece scores those pieces -1e9); returns how many."""
    merges = model["merges"]
    is_run = [set(a + b) == {SPIECE} for a, b in map(_merge_pair, merges)]
    model["merges"] = [m for m, run in zip(merges, is_run, strict=True) if not run] + [
        m for m, run in zip(merges, is_run, strict=True) if run
    ]
    return sum(is_run)


def _prepare(tokenizer) -> _Prepared:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    size = backend.get_vocab_size(with_added_tokens=True) if backend is not None else len(tokenizer)
    prepared = _PREPARED.get(tokenizer)
    if prepared is not None and prepared.size == size:
        return prepared
    state = json.loads(backend.to_str()) if backend is not None else None
    if state is not None and _is_sentencepiece(state):
        moved = _spm_merge_order(state["model"])
        state["truncation"] = state["padding"] = None
        prepared = _Prepared(size, True, state, moved)
        logger.info(
            "tokenizer %s: SentencePiece BPE; prompts are tokenized in each template's mode with "
            "SentencePiece's merge order (%d whitespace-run merges ranked last)",
            getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
            moved,
        )
    else:
        prepared = _Prepared(size, False)
        logger.info(
            "tokenizer %s is not SentencePiece BPE: prompts are tokenized by it as it is (no dummy prefix)",
            getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        )
    _PREPARED[tokenizer] = prepared
    return prepared


def _backend(prepared: _Prepared, legacy: bool):
    """The private backend of one mode (built once per tokenizer and mode)."""
    if legacy not in prepared.backends:
        from tokenizers import Tokenizer

        state = dict(prepared.state)
        if legacy:
            state["normalizer"] = {
                "type": "Sequence",
                "normalizers": [
                    {"type": "Prepend", "prepend": SPIECE},
                    {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE},
                ],
            }
            state["pre_tokenizer"] = None
        else:
            state["normalizer"] = None
            state["pre_tokenizer"] = {
                "type": "Metaspace",
                "replacement": SPIECE,
                "prepend_scheme": "first",
                "split": False,
            }
        prepared.backends[legacy] = Tokenizer.from_str(json.dumps(state))
    return prepared.backends[legacy]


def describe(tokenizer, mode: TokenizerMode) -> dict:
    """What :func:`tokenize` does with this tokenizer in ``mode`` (for logs and ``data preview --json``)."""
    prepared = _prepare(tokenizer)
    if not prepared.sentencepiece:
        return {
            "mode": "native",
            "legacy": None,
            "description": "the tokenizer as it is (not SentencePiece BPE)",
        }
    return {
        "mode": mode.name,
        "legacy": mode.legacy,
        "description": mode.describe(),
        "whitespace_merges_ranked_last": prepared.moved,
    }


def announce(tokenizer, template: str, mode: TokenizerMode) -> None:
    """Log once per tokenizer and template how its prompts are tokenized."""
    prepared = _prepare(tokenizer)
    if template not in prepared.announced:
        prepared.announced.add(template)
        logger.info("template %s: %s", template, describe(tokenizer, mode)["description"])


def tokenize(tokenizer, texts: list[str], mode: TokenizerMode) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat token ids, flat (start, end) character offsets into each text, and per-text token counts.

    Added tokens (``<s>``, ``</s>``, the image token) written in the text are their ids; no BOS is added.
    """
    prepared = _prepare(tokenizer)
    if prepared.sentencepiece and not mode.native:
        encs = _backend(prepared, mode.legacy).encode_batch(texts, add_special_tokens=False)
        ids_rows, offset_rows = [e.ids for e in encs], [e.offsets for e in encs]
    else:
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


def save_training_tokenizer(tokenizer, mode: TokenizerMode, folder) -> bool:
    """Rewrite the tokenizer files in ``folder`` (where a processor or tokenizer was just saved) so that plain
    ``AutoTokenizer`` / ``AutoProcessor`` reproduce the ids :func:`tokenize` gives in ``mode``: the mode's
    pipeline as tokenizer.json, loaded as it is (``tokenizer_class: TokenizersBackend``; a ``LlamaTokenizer``
    class would rebuild a non-legacy pipeline on load). Returns False, changing nothing, for a tokenizer that is
    not SentencePiece BPE (it is used as it is)."""
    import copy
    from pathlib import Path

    prepared = _prepare(tokenizer)
    if not prepared.sentencepiece or mode.native:
        return False
    folder = Path(folder)
    saved = copy.deepcopy(tokenizer)
    saved._tokenizer = _backend(prepared, mode.legacy)
    saved.save_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return True
