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


CLIP_PROCESSORS = ("CLIPImageProcessor", "CLIPImageProcessorPil", "LlavaImageProcessor", "LlavaImageProcessorPil")


def image_processor_as(image_processor, family: str, **changes):
    """The same preprocessing (resize, crop, rescale, normalise) as a ``family`` (CLIP or Llava) image processor of
    the same backend (PIL or torchvision), with ``changes``."""
    from transformers.image_processing_backends import TorchvisionBackend

    torchvision = isinstance(image_processor, TorchvisionBackend)
    if family == "Llava":
        if torchvision:
            from transformers.models.llava.image_processing_llava import LlavaImageProcessor as cls
        else:
            from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil as cls
    elif torchvision:
        from transformers.models.clip.image_processing_clip import CLIPImageProcessor as cls
    else:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    fields = {k: v for k, v in image_processor.to_dict().items()
              if k not in ("image_processor_type", "processor_class", "do_pad", "pad_size")}
    return cls(**fields, **changes)
