"""The tokenizer and processor pieces every LLaVA folder the kit writes shares (tiny, composed, imported)."""

from __future__ import annotations

import shutil
from pathlib import Path


def mistral_tokenizer(out: Path):
    """The real Mistral-7B-Instruct-v0.2 SentencePiece tokenizer shipped in ``mistral-common``."""
    import mistral_common
    from transformers import LlamaTokenizer

    src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, out / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(out)


def add_llava_tokens(tokenizer, image_token: str) -> None:
    """Add the image placeholder (and a pad token when missing) as special tokens."""
    tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})


def make_processor(tokenizer, image_size: int, patch_size: int, image_token: str, image_processor=None):
    """A LlavaProcessor for a CLIP tower with the 'default' feature strategy (CLS dropped)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if image_processor is None:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=image_token,
    )
