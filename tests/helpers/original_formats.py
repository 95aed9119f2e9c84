"""The original trainings' prompt formats, restated independently (not copied) to test ``qlora_med.prompts`` against.

Nothing here imports ``qlora_med``: the tokenizer is SentencePiece itself and the formats are rewritten from the
published code, each function naming what it restates.

Tokenizer, :class:`SlowLegacyTokenizer`: the slow ``LlamaTokenizer`` of transformers 4.36 with ``legacy=True``,
which LLaVA / LLaVA-Med v1.5 loaded (``AutoTokenizer.from_pretrained(..., use_fast=False)``):
``PreTrainedTokenizer.tokenize`` splits the text on the added tokens (its ``Trie``: leftmost match, longest
first) and keeps them whole (Mistral's ``<unk> <s> </s>`` and LLaVA's added tokens strip no whitespace:
``AddedToken(lstrip=False, rstrip=False)``); ``LlamaTokenizer._tokenize`` in legacy mode encodes each non-empty
piece with ``sp_model.encode``, and SentencePiece puts its dummy prefix ``▁`` in front of each piece;
``__call__`` adds the BOS (``add_bos_token=True``, ``add_eos_token=False``).

LLaVA-Med v1.5 (microsoft/LLaVA-Med, main):
* ``llava/conversation.py`` ``Conversation.get_prompt``: SeparatorStyle.LLAMA_2 for ``conv_mistral_instruct``
  (system "", sep "", sep2 "</s>") -> :func:`llama_2_prompt`; SeparatorStyle.TWO for ``conv_vicuna_v1`` (sep " ",
  sep2 "</s>"; LLaVA-Med writes ``"</s> "`` after an answer and strips the whole prompt) -> :func:`two_prompt`.
* ``llava/mm_utils.py`` ``tokenizer_image_token`` -> :func:`tokenizer_image_token`.

LLaVA 1.5 (haotian-liu/LLaVA ``llava/train/train.py``), the training code LLaVA-Med v1.5 builds on:
* ``preprocess_multimodal`` (the image placeholder moved to the front of its turn) -> :func:`image_first`;
* ``preprocess_llama_2`` / ``preprocess_v1`` (rounds split on sep2, ``cur_len`` from 1, instruction length by
  ``tokenizer_image_token`` minus 2, everything masked on a length mismatch) -> :func:`llava_med_v15`,
  :func:`vicuna_v1` (both via :func:`_round_masks`);
* ``preprocess_plain`` -> :func:`plain`.

LLaVA-Med v1.0.0 (microsoft/LLaVA-Med v1.0.0 ``llava/train/train.py``): the default branch of ``preprocess``
with ``_add_speaker_and_signal``, ``_tokenize_fn`` and ``_mask_targets``, roles Human / Assistant, the image
placeholder where the data puts it -> :func:`llava_med_v1`.

The image is one ``image_id`` position here (LLaVA's ``IMAGE_TOKEN_INDEX``); :func:`expand_image` makes it the
model's image features, masked, as LLaVA's ``prepare_inputs_labels_for_multimodal`` does.
"""

from __future__ import annotations

import re

IGNORE = -100
IMAGE = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class SlowLegacyTokenizer:
    """transformers 4.36's slow LlamaTokenizer(legacy=True) over a SentencePiece model (see the module docstring)."""

    def __init__(self, sp, added: dict[str, int], bos_id: int = 1) -> None:
        self.sp, self.added, self.bos_id = sp, added, bos_id
        self.split_re = re.compile("(" + "|".join(map(re.escape, sorted(added, key=len, reverse=True))) + ")")

    def tokenize_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(self.split_re.split(text)):
            if i % 2:
                ids.append(self.added[piece])
            elif piece:
                ids.extend(self.sp.encode(piece))
        return ids

    def __call__(self, text: str) -> list[int]:
        return [self.bos_id, *self.tokenize_ids(text)]


def tokenizer_image_token(prompt: str, tok: SlowLegacyTokenizer, image_id: int) -> list[int]:
    """mm_utils.tokenizer_image_token: each chunk around ``<image>`` tokenized with its BOS, one BOS kept."""
    chunks = [tok(chunk) for chunk in prompt.split(IMAGE)]
    ids = [tok.bos_id]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_id)
        ids.extend(chunk[1:])  # every chunk starts with the BOS the first one already gave
    return ids


def image_first(value: str) -> str:
    """preprocess_multimodal: a turn holding ``<image>`` becomes ``<image>\\n`` + the rest, stripped."""
    if IMAGE not in value:
        return value
    return (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()


def _messages(rounds: list[tuple[str, str | None]]) -> list[str | None]:
    return [m for q, a in rounds for m in (image_first(q), a)]


def llama_2_prompt(rounds: list[tuple[str, str | None]]) -> str:
    """get_prompt, LLAMA_2 style with conv_mistral_instruct's system "", sep "", sep2 "</s>"."""
    ret = ""
    for i, message in enumerate(_messages(rounds)):
        if not message:
            continue
        if i % 2 == 0:
            ret += f"[INST] {message} [/INST]"  # sep "" before it; wrap_sys("") adds nothing
        else:
            ret += " " + message + " " + "</s>"
    return ret


def two_prompt(rounds: list[tuple[str, str | None]], system: str = VICUNA_SYSTEM) -> str:
    """get_prompt, TWO style as LLaVA-Med writes it for conv_vicuna_v1 (USER / ASSISTANT, sep " ", sep2 "</s>")."""
    ret = system + " "
    for i, message in enumerate(_messages(rounds)):
        role = ("USER", "ASSISTANT")[i % 2]
        if message:
            ret += role + ": " + message.strip() + ("</s> " if i % 2 else " ")
        else:
            ret += role + ":"
    return ret.strip()


def _round_masks(prompt: str, ids: list[int], tok, image_id: int, sep: str) -> list[int]:
    """The masking loop of preprocess_llama_2 / preprocess_v1 with has_image=True."""
    target = list(ids)
    cur = 1
    target[:cur] = [IGNORE] * cur
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou, tok, image_id))
        instruction_len = len(tokenizer_image_token(parts[0], tok, image_id)) - 2
        target[cur : cur + instruction_len] = [IGNORE] * len(target[cur : cur + instruction_len])
        cur += round_len
    target[cur:] = [IGNORE] * len(target[cur:])
    if cur != len(ids):  # "WARNING: tokenization mismatch" (ignored sample)
        target = [IGNORE] * len(ids)
    return target


def llava_med_v15(rounds, tok, image_id) -> tuple[str, list[int], list[int]]:
    """LLaVA-Med v1.5's training sample: prompt, ids (tokenizer_image_token) and labels (preprocess_llama_2)."""
    prompt = llama_2_prompt(rounds)
    ids = tokenizer_image_token(prompt, tok, image_id)
    return prompt, ids, _round_masks(prompt, ids, tok, image_id, "[/INST] ")


def vicuna_v1(rounds, tok, image_id) -> tuple[str, list[int], list[int]]:
    """conv_vicuna_v1 + preprocess_v1 (sep " ASSISTANT: ")."""
    prompt = two_prompt(rounds)
    ids = tokenizer_image_token(prompt, tok, image_id)
    return prompt, ids, _round_masks(prompt, ids, tok, image_id, " ASSISTANT: ")


def plain(rounds, tok, image_id) -> tuple[str, list[int], list[int]]:
    """preprocess_plain: the first turn becomes ``<image>``, then the caption and conv_llava_plain's sep "\\n"."""
    prompt = IMAGE + rounds[0][1] + "\n"
    ids = tokenizer_image_token(prompt, tok, image_id)
    masked = len(tokenizer_image_token(IMAGE, tok, image_id))
    return prompt, ids, [IGNORE] * masked + ids[masked:]


def llava_med_v1(rounds, tok, image_id, n_image: int) -> tuple[str, list[int], list[int]]:
    """LLaVA-Med v1.0.0's preprocess (default branch): ids and labels, the image already ``n_image`` positions.

    v1.0 replaced ``<image>`` by its patch tokens before tokenizing, so here the image is expanded first; every
    length below counts them.
    """
    header = f"{V1_SYSTEM}\n\n"
    sentences: list[tuple[str, str]] = []  # _add_speaker_and_signal: "### " + role + ": " + value + "\n"
    for q, a in rounds:
        sentences += [("human", "### Human: " + q + "\n"), ("gpt", "### Assistant: " + a + "\n")]
    conversation = header + "".join(value for _, value in sentences) + "### "

    def tokenize(text: str) -> list[int]:  # _tokenize_fn: tokenizer(text), image patches as added tokens
        ids = tok(text)
        return [t for i in ids for t in ([i] * n_image if i == image_id else [i])]

    ids = tokenize(conversation)
    target = list(ids)
    lens = [len(tokenize(header))] + [len(tokenize(value)) for _, value in sentences]
    cur = lens[0]  # _mask_targets
    target[:cur] = [IGNORE] * cur
    for length, (speaker, _) in zip(lens[1:], sentences, strict=True):
        if speaker == "human":
            target[cur + 2 : cur + length] = [IGNORE] * len(target[cur + 2 : cur + length])
        cur += length
    return conversation, ids, target


def expand_image(
    ids: list[int], labels: list[int], image_id: int, n_image: int
) -> tuple[list[int], list[int]]:
    """The image position as ``n_image`` image features, none of them a label."""
    out_ids, out_labels = [], []
    for i, label in zip(ids, labels, strict=True):
        if i == image_id:
            out_ids += [image_id] * n_image
            out_labels += [IGNORE] * n_image
        else:
            out_ids.append(i)
            out_labels.append(label)
    return out_ids, out_labels
