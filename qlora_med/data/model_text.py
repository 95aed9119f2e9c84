"""What encoding a conversation needs of a model, without its weights: the tokenizer (with the image token),
the tokens each image becomes, the image token as the templates write it, and the chat format for template
``chat_template``. ``data check`` and ``data preview`` read it as training does (:mod:`qlora_med.train.runner`:
the family's processor, :func:`~qlora_med.model.family.image_spec`, :func:`~qlora_med.model.family.chat_format`).

Default (no model named): the real Mistral-7B-Instruct-v0.2 tokenizer (offline) and LLaVA-Med v1.5's 576 image
tokens. A model folder or a Hub id ``org/name[@revision]`` (its configs and tokenizer files only, through the HF
cache): a VLM of a supported family (:data:`qlora_med.config.families.FAMILIES`) gives its processor's tokenizer,
count and image token (LLaVA: its tokenizer and its tower's count); any other model (a plain LLM, LLaVA's
original layout) gives its tokenizer and the default count.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_med.config.families import BY_MODEL_TYPE, CHAT_TEMPLATE, FAMILIES, Family
from qlora_med.data.records import IMAGE_TOKEN
from qlora_med.errors import ConfigError
from qlora_med.prompts.chat_render import ChatFormat

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_TOKENS = 576  # CLIP ViT-L/14 at 336 px (LLaVA-Med v1.5)


@dataclass
class ModelText:
    """A model's text side as encoding sees it: ``image_token`` is the string the templates write (the one
    ``tokenizer`` knows as the image token), repeated ``image_tokens`` times per image; ``chat`` only for
    template ``chat_template``."""

    tokenizer: Any
    image_tokens: int
    image_token: str = IMAGE_TOKEN
    chat: ChatFormat | None = None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/qlora-med`` (default ``~/.cache/qlora-med``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora-med"


def mistral_with_image_token(image_token: str, cache_dir: Path | None = None):
    """The real Mistral-7B-Instruct-v0.2 tokenizer (no network) plus the LLaVA tokens.

    Converting it from SentencePiece takes seconds, so the result is saved once under
    ``<cache_dir>/tokenizers`` and loaded from there afterwards.
    """
    import mistral_common
    from transformers import AutoTokenizer

    from qlora_med.io import atomic_dir
    from qlora_med.model.processor import add_llava_tokens, mistral_tokenizer

    tag = hashlib.sha256(image_token.encode()).hexdigest()[:8]
    saved = (cache_dir or default_cache_dir()) / "tokenizers" / f"mistral-v0.2-{mistral_common.__version__}-{tag}"
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(saved)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = mistral_tokenizer(Path(tmp))
    add_llava_tokens(tokenizer, image_token)
    try:
        with atomic_dir(saved) as tmp_dir:
            tokenizer.save_pretrained(tmp_dir)
    except OSError as err:  # a read-only home is fine: convert again next time
        logger.debug("could not cache the tokenizer in %s: %s", saved, err)
    return tokenizer


def _with_image_token(tokenizer, image_token: str):
    """``tokenizer``, the image token (and a pad token) added when it lacks them (as LLaVA's build adds them)."""
    from qlora_med.model.processor import add_llava_tokens

    if image_token not in tokenizer.get_vocab():
        add_llava_tokens(tokenizer, image_token)
    return tokenizer


def _no_chat(what: str) -> ConfigError:
    """The one-line refusal of template chat_template for ``what``, a model without a family's processor."""
    return ConfigError(
        f"template chat_template needs a VLM's processor (its chat template and image tokens), and {what} is not "
        f"a model of a supported family ({', '.join(FAMILIES)}); use such a model (data check: --tokenizer), or "
        "pick one of the kit's templates (e.g. llava_med_v15)"
    )


def _family_text(folder: Path, config, family: Family, image_token: str, image_size: int | None,
                 template: str | None) -> ModelText:
    """A family VLM's tokenizer, count and image token from its processor, as training reads them; LLaVA's
    from its tokenizer alone unless its chat template is wanted."""
    from transformers import AutoTokenizer

    from qlora_med.model.family import chat_format, image_spec, load_processor, tokens_from_config

    wants_chat = template == CHAT_TEMPLATE
    if family.name == "llava" and not wants_chat:
        tokenizer = _with_image_token(AutoTokenizer.from_pretrained(folder), image_token)
        return ModelText(tokenizer, tokens_from_config(config), image_token)
    processor = load_processor(folder, family)
    if not family.image_placeholder:  # LLaVA-style: the templates write model.image_token itself
        _with_image_token(processor.tokenizer, image_token)
    spec = image_spec(config, processor, image_size, image_token)
    tokenizer = processor.tokenizer
    chat = chat_format(processor, spec) if wants_chat else None
    return ModelText(tokenizer, spec.tokens, tokenizer.convert_ids_to_tokens(spec.image_token_id), chat)


def load_model_text(name_or_path: str | None, image_token: str = IMAGE_TOKEN, image_size: int | None = None,
                    template: str | None = None, cache_dir: Path | None = None) -> ModelText:
    """The :class:`ModelText` of a model folder or Hub id (see the module docstring); ``image_size``:
    ``model.image_size`` (any-res / dynamic families); ``template``: the chat format is read only for
    ``chat_template`` (a ConfigError when the model has none)."""
    if name_or_path is None:
        if template == CHAT_TEMPLATE:
            raise _no_chat("the default Mistral tokenizer")
        return ModelText(mistral_with_image_token(image_token, cache_dir), DEFAULT_IMAGE_TOKENS, image_token)
    from transformers import AutoConfig, AutoTokenizer

    from qlora_med.model.source import resolve_model

    folder = resolve_model(name_or_path, key="--tokenizer", weights=False)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError):  # no config.json, or a model_type transformers lacks (LLaVA's original layout)
        config = None
    family = BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    if family is not None and hasattr(config, "vision_config"):
        return _family_text(folder, config, family, image_token, image_size, template)
    if template == CHAT_TEMPLATE:
        raise _no_chat(f"'{name_or_path}'")
    tokenizer = _with_image_token(AutoTokenizer.from_pretrained(folder), image_token)
    return ModelText(tokenizer, DEFAULT_IMAGE_TOKENS, image_token)
