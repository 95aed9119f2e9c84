"""The tokenizer of a GGUF export: llama.cpp's SentencePiece (``llama``) vocabulary, built to tokenize like training.

llama.cpp's SPM tokenizer merges symbol pairs by the *score* of the merged piece, so the scores must be
the SentencePiece model's (``tokenizer.model``), not a constant: with ``-1000`` everywhere every merge
ties and "radiograph" becomes ``▁radio graph`` instead of ``▁radi ograph``. Token types come from the
same model (``<unk>`` UNKNOWN, ``<s>``/``</s>`` CONTROL, ``<0xNN>`` BYTE), tokens the kit added
(``<image>``, ``<pad>``) are CONTROL when special and USER_DEFINED otherwise, as llama.cpp's
``convert_hf_to_gguf.py`` does for Llama/Mistral; rows past the tokenizer are ``[PAD{i}]`` (UNUSED).

``add_space_prefix`` follows the HF tokenizer saved with the model (``tokenizer.json``: what training
tokenized with, see :func:`qlora_med.prompts.tokenization.save_training_tokenizer`), not the SentencePiece
model's ``add_dummy_prefix`` alone, because llama.cpp's prefix goes before every text fragment that starts the
input or follows a special token (BOS included):

* a ``Prepend("▁")`` normalizer (SentencePiece legacy mode, what the kit trains with; the Hub's Llama/Mistral
  ``tokenizer.json``) or ``Metaspace`` ``always``: ``▁`` before every text piece between added tokens, exactly
  llama.cpp's prefix: on.
* ``Metaspace`` ``first`` / ``never`` (transformers 5's non-legacy conversion): ``▁`` only at the very start of
  the input, never after a special token (``<s>[INST]`` is ``<s> [ INST ]``): off, so every text that starts with
  a special token (every template, every llama.cpp chat prompt) tokenizes identically; raw text at the very start
  with no BOS and no leading space then differs (HF ``▁What``, llama.cpp ``What``).
* no ``tokenizer.json``: the SentencePiece model's ``add_dummy_prefix``.

The chat template is the one the model was trained with, its image placeholder replaced by llama.cpp's media
marker (:func:`gguf_chat_template`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qlora_med.artifacts.run_dir import META_FILE
from qlora_med.errors import QloraMedError

logger = logging.getLogger(__name__)

SPM_FILE = "tokenizer.model"
_SPACE = "\u2581"
MTMD_MARKER = "<__media__>"  # llama.cpp's mtmd_default_marker()


def find_spm_model(merged: Path) -> Path:
    """``tokenizer.model`` of the merged dir, else of the base it was merged onto (``qlora_med.json``)."""
    candidates = [merged / SPM_FILE]
    if (merged / META_FILE).is_file():
        base = json.loads((merged / META_FILE).read_text()).get("base_model")
        if base:
            candidates.append(Path(base) / SPM_FILE)
    for path in candidates:
        if path.is_file():
            return path
    raise QloraMedError(
        f"GGUF export needs the SentencePiece model of the tokenizer (llama.cpp merges by its scores); none of "
        f"{[str(c) for c in candidates]} exists. Copy the base model's {SPM_FILE} into {merged}"
    )


def add_space_prefix(merged: Path, spm_path: Path) -> bool:
    """Whether llama.cpp should prefix a text fragment with a space, as the HF tokenizer does (module doc)."""
    tokenizer_json = merged / "tokenizer.json"
    if tokenizer_json.is_file():
        spec = json.loads(tokenizer_json.read_text())
        normalizer = spec.get("normalizer") or {}
        steps = (
            normalizer.get("normalizers", [normalizer])
            if normalizer.get("type") == "Sequence"
            else [normalizer]
        )
        if any(s.get("type") == "Prepend" and s.get("prepend") == _SPACE for s in steps):
            return True
        pre = spec.get("pre_tokenizer") or {}
        pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        for step in pres:
            if step.get("type") == "Metaspace":
                return step.get("prepend_scheme", "always") == "always" and step.get("add_prefix_space", True)
        if normalizer or pre:
            return False
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_path.read_bytes())
    return bool(proto.normalizer_spec.add_dummy_prefix)


def _spm_type(sp, i: int):
    import gguf

    for test, kind in (
        (sp.is_unknown, "UNKNOWN"),
        (sp.is_control, "CONTROL"),
        (sp.is_unused, "UNUSED"),
        (sp.is_byte, "BYTE"),
    ):
        if test(i):
            return gguf.TokenType[kind]
    return gguf.TokenType.NORMAL


def spm_vocab(tokenizer, spm_path: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and types of the SentencePiece model + the tokenizer's added tokens, padded to ``vocab_size``."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    types = gguf.TokenType
    sp = SentencePieceProcessor(model_file=str(spm_path))
    n = sp.get_piece_size()
    if max(n, len(tokenizer)) > vocab_size:
        raise QloraMedError(
            f"tokenizer has {max(n, len(tokenizer))} tokens but the embeddings only {vocab_size} rows"
        )
    pieces = [sp.id_to_piece(i) for i in range(n)]
    mismatch = [
        i
        for i, (a, b) in enumerate(zip(pieces, tokenizer.convert_ids_to_tokens(list(range(n))), strict=True))
        if a != b
    ]
    if mismatch:
        i = mismatch[0]
        raise QloraMedError(
            f"{spm_path} is not the model's tokenizer: {len(mismatch)} pieces differ, e.g. id {i} "
            f"{pieces[i]!r} != {tokenizer.convert_ids_to_tokens(i)!r}"
        )
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    kinds = [int(types.UNUSED)] * vocab_size
    for i, piece in enumerate(pieces):
        tokens[i], scores[i] = piece.encode(), sp.get_score(i)
        kinds[i] = int(_spm_type(sp, i))
    for i, added in sorted(tokenizer.added_tokens_decoder.items()):
        if i < n:  # <unk>, <s>, </s>: the SentencePiece type (UNKNOWN stays UNKNOWN)
            continue
        text = added.content if added.special else added.content.replace(_SPACE, " ")
        tokens[i], scores[i] = text.encode(), -1000.0
        kinds[i] = int(types.CONTROL if added.special else types.USER_DEFINED)
    return tokens, scores, kinds


def gguf_chat_template(merged: Path, processor) -> str | None:
    """The model's chat template with llama.cpp's media marker as the image placeholder.

    llama.cpp's multimodal tools (``llama-mtmd-cli``, ``llama-server``) put an image into the message text
    as :data:`MTMD_MARKER` and have no ``<image>`` token, so the template the kit trained with (known from
    ``qlora_med.json``) is rebuilt with that marker: ``-p "What is shown?" --image x.png`` then renders
    ``<s>[INST] <__media__>\\nWhat is shown? [/INST]``, the training layout. Other templates are kept as is.
    """
    from qlora_med.prompts.chat_template import chat_template

    meta = json.loads((merged / META_FILE).read_text()) if (merged / META_FILE).is_file() else {}
    if meta.get("template"):
        try:
            return chat_template(meta["template"], MTMD_MARKER)
        except ValueError:
            pass
    tokenizer = getattr(processor, "tokenizer", processor)
    return getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)


def add_vocab(writer, merged: Path, vocab_size: int) -> None:
    """Write the ``llama`` (SentencePiece) tokenizer, special ids and the chat template of ``merged``."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(merged)
    tokenizer = getattr(processor, "tokenizer", processor)
    spm_path = find_spm_model(merged)
    tokens, scores, kinds = spm_vocab(tokenizer, spm_path, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    prefix = add_space_prefix(merged, spm_path)
    writer.add_add_space_prefix(prefix)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(True)  # every training template starts with BOS; llama.cpp strips a rendered one
    writer.add_add_eos_token(False)
    template = gguf_chat_template(merged, processor)
    if template:
        writer.add_chat_template(template)
    else:
        logger.warning("%s has no chat template: llama.cpp will fall back to its own guess", merged)
    logger.info("GGUF vocabulary: %d tokens from %s, add_space_prefix=%s", len(tokens), spm_path, prefix)
