"""The prompts layer's tokenizer modes: SentencePiece-exact, and the same ids whatever the tokenizer folder says."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import mistral_common
import pytest
import sentencepiece as spm
from helpers.original_formats import SlowLegacyTokenizer

from qlora_med.prompts.templates import KIT_TEMPLATES as TEMPLATES
from qlora_med.prompts.templates import encode, render, tokenizer_mode
from qlora_med.prompts.tokenization import LEGACY, NON_LEGACY, describe, tokenize

SP_MODEL = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
ROUNDS = [
    ("Is there a pneumothorax?\n<image>", "No,  the lung is  fully expanded. "),
    ("\nWhich lobe?", "Left upper."),
]


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(SP_MODEL))


@pytest.fixture(scope="module")
def tok(processor):
    return processor.tokenizer


def _ids(tokenizer, texts, mode=LEGACY):
    ids, _, counts = tokenize(tokenizer, texts, mode)
    ends = counts.cumsum()
    return [ids[e - c : e].tolist() for c, e in zip(counts, ends, strict=True)]


def test_legacy_mode_is_sentencepiece_piece_by_piece(tok, sp):
    slow = SlowLegacyTokenizer(sp, tok.get_added_vocab())
    rng = random.Random(0)
    alphabet = [
        *"  \n\t",
        *"abcdefghij",
        *"USERINST[]/:.,?()-'",
        "ü",
        "日",
        "✓",
        "²",
        "<s>",
        "</s>",
        "<image>",
    ]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 48))) for _ in range(3000)]
    texts += [" " * n + word for n in range(40) for word in ("", "x", "USER", "\n", "Immunohistochemistry")]
    texts += [
        "</s> USER: Which lobe?  ASSISTANT:",
        "<s>[INST] <image>\nIs there  a pneumothorax? [/INST] No. </s>",
    ]
    assert _ids(tok, texts) == [slow.tokenize_ids(t) for t in texts]


def test_the_folders_own_pipeline_differs(tok):
    """Why the mode is set explicitly: transformers 5's saved tokenizer is not legacy, nor SentencePiece-exact."""

    def pieces(ids):
        return tok.convert_ids_to_tokens(ids)

    text = "<s>[INST] x</s> USER:"  # the dummy prefix after special tokens
    assert pieces(tok(text, add_special_tokens=False)["input_ids"]) == [
        "<s>",
        "[",
        "INST",
        "]",
        "▁x",
        "</s>",
        "▁US",
        "ER",
        ":",
    ]
    assert pieces(_ids(tok, [text])[0]) == ["<s>", "▁[", "INST", "]", "▁x", "</s>", "▁", "▁US", "ER", ":"]
    text = "x  USER"  # the merge order of whitespace runs
    assert pieces(tok(text, add_special_tokens=False)["input_ids"]) == ["▁x", "▁▁", "USER"]
    assert pieces(_ids(tok, [text])[0]) == ["▁x", "▁", "▁US", "ER"]


def _old_format_tokenizer(tok, folder: Path):
    """The same vocabulary saved as Llama's old tokenizer.json (Prepend normalizer, no pre-tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tok.backend_tokenizer.to_str())
    state["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    state["pre_tokenizer"] = None
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(state))
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>", eos_token="</s>"
    )


def test_ids_do_not_depend_on_how_the_tokenizer_was_saved(tok, tmp_path):
    from transformers import LlamaTokenizer

    from qlora_med.model.processor import add_llava_tokens

    shutil.copy(SP_MODEL, tmp_path / "tokenizer.model")
    variants = {
        "saved by transformers 5": tok,
        "legacy=True from tokenizer.model": LlamaTokenizer.from_pretrained(tmp_path, legacy=True),
        "legacy=False from tokenizer.model": LlamaTokenizer.from_pretrained(tmp_path, legacy=False),
        "old tokenizer.json format": _old_format_tokenizer(tok, tmp_path / "old"),
    }
    for other in variants.values():
        if "<image>" not in other.get_vocab():
            add_llava_tokens(other, "<image>")
    image_id = tok.convert_tokens_to_ids("<image>")
    for template in sorted(TEMPLATES):
        rendered = render(template, ROUNDS, "<image>")
        want = encode(tok, rendered, image_id, 3, 4096)
        for name, other in variants.items():
            assert other.convert_tokens_to_ids("<image>") == image_id
            got = encode(other, rendered, image_id, 3, 4096)
            assert (got.input_ids, got.labels) == (want.input_ids, want.labels), (template, name)
            assert describe(other, tokenizer_mode(template))["mode"] == "sentencepiece_legacy"


def test_the_tokenizer_itself_is_left_alone(tok):
    before = tok.backend_tokenizer.to_str()
    tokenize(tok, ["<s>[INST] x  y</s>"], LEGACY)
    tokenize(tok, ["<s>[INST] x  y</s>"], NON_LEGACY)
    assert tok.backend_tokenizer.to_str() == before


def test_non_legacy_mode_prefixes_the_start_of_the_text_only(tok):
    pieces = [
        tok.convert_ids_to_tokens(ids) for ids in _ids(tok, ["[INST] x</s>[INST] y", "<s>[INST]"], NON_LEGACY)
    ]
    assert pieces == [["▁[", "INST", "]", "▁x", "</s>", "[", "INST", "]", "▁y"], ["<s>", "[", "INST", "]"]]


def test_every_template_is_legacy_and_says_so(tok):
    for template in TEMPLATES:
        assert tokenizer_mode(template) == LEGACY
    info = describe(tok, LEGACY)
    assert (
        info["legacy"] is True
        and info["whitespace_merges_ranked_last"] > 0
        and "legacy" in info["description"]
    )


def test_other_tokenizers_are_used_as_they_are():
    """A byte-level BPE tokenizer has no dummy prefix: its own ids and offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        ["Is there a pneumothorax? No."] * 20,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<s>", "</s>", "<image>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    other = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    assert describe(other, LEGACY)["mode"] == "native"
    text = render("mistral_instruct", [("<image>\nIs there a pneumothorax?", "No.")], "<image>").text
    assert _ids(other, [text])[0] == other(text, add_special_tokens=False)["input_ids"]
