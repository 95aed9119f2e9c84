"""The VLM families the kit trains, as data: where each part of the model lives, how images become tokens,
which templates fit and which kernels apply. Pure (no torch): ``validate`` and the planner read it.

Every path is a full module path of the transformers 5 model (``model.vision_tower``): quantization skips the
tower and the connector (bare names do not stop it), freezing and the projector parameter group use the same
paths. "Connector" is the family's projector: LLaVA's ``multi_modal_projector`` (plus LLaVA-NeXT's learned
``image_newline``), Qwen2.5-VL's patch ``merger``, Gemma 3's ``multi_modal_projector``; it trains in full
precision with its own learning rate, the tower stays frozen and the language model gets LoRA.

Images become a fixed number of tokens per recipe: LLaVA's count is fixed by the tower; any-res and
dynamic-resolution families see every image padded to a square (``model.image_aspect``) and resized to
``model.image_size`` (default :attr:`Family.image_side`), so each image gives the same count, the one the
family's own processor computes for that size.

Adding a family: one :class:`Family` entry in :data:`FAMILIES` (its ``model_types`` as config.json writes
them), a tiny builder in ``qlora_med.model.tiny`` and its row in the test matrix (tests/integration/test_family_matrix.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qlora_med.errors import ConfigError

ImageTokens = Literal["fixed", "anyres", "dynamic"]
CHAT_TEMPLATE = "chat_template"  # the processor's own chat template (prompts.chat_render)
LLAVA_TEMPLATES = ("llava_med_v15", "mistral_instruct", "vicuna_v1", "llava_med_v1", "plain")


@dataclass(frozen=True)
class Family:
    """One architecture: module paths, image tokens, templates and kernel support."""

    name: str
    title: str  # as the README's model table names it
    model_types: tuple[str, ...]  # config.json ``model_type`` values
    hf_class: str  # the transformers class that loads it
    vision_tower: str  # module path of the (frozen) vision encoder
    connector: tuple[str, ...]  # module/parameter paths trained in full as the "projector"
    language_model: str  # module path of the decoder (LoRA targets its layers)
    image_tokens: ImageTokens
    image_token: str  # the token repeated once per image feature
    templates: tuple[str, ...]  # the first is the default
    image_placeholder: str = ""  # what the chat template writes for an image (default: image_token)
    image_sequence: str = "{image}"  # the text an image placeholder becomes; {image} is the run of image tokens
    turn_end: str = ""  # closes an assistant turn in the chat template: trained with the answer
    batch_keys: tuple[str, ...] = ("pixel_values",)  # image-processor outputs the forward takes
    token_type_ids: bool = False  # the forward wants token_type_ids (1 on image tokens) while training
    image_side: int | None = None  # any-res / dynamic: default square side images are resized to
    side_multiple: int = 1  # model.image_size must be a multiple of this
    padding_free: str = ""  # why padding-free packing is off for this family ("" = it works)
    chunked_loss: str = ""  # why the chunked loss patch is off ("" = it works)
    gguf: str = ""  # why GGUF export is refused ("" = llama.cpp supports it)
    examples: tuple[str, ...] = ()  # Hub ids of this family

    @property
    def placeholder(self) -> str:
        return self.image_placeholder or self.image_token

    @property
    def quant_skip(self) -> list[str]:
        """Full module paths quantization leaves in full precision (tower, connector, lm_head)."""
        return [self.vision_tower, *self.connector, "lm_head"]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llava", title="LLaVA 1.5 / LLaVA-Med v1.5", model_types=("llava",),
            hf_class="LlavaForConditionalGeneration", vision_tower="model.vision_tower",
            connector=("model.multi_modal_projector",), language_model="model.language_model",
            image_tokens="fixed", image_token="<image>", templates=(*LLAVA_TEMPLATES, CHAT_TEMPLATE),
            examples=("llava-hf/llava-1.5-7b-hf", "microsoft/llava-med-v1.5-mistral-7b"),
        ),
        Family(
            name="llava_next", title="LLaVA-NeXT (1.6), any-res", model_types=("llava_next",),
            hf_class="LlavaNextForConditionalGeneration", vision_tower="model.vision_tower",
            connector=("model.multi_modal_projector", "model.image_newline"),
            language_model="model.language_model", image_tokens="anyres", image_token="<image>",
            templates=("llava_med_v15", "mistral_instruct", "vicuna_v1", CHAT_TEMPLATE),
            batch_keys=("pixel_values", "image_sizes"), image_side=672, side_multiple=1,
            padding_free="", gguf="llama.cpp's LLaVA-NeXT any-res path needs its own image-grid metadata, "
            "which the kit's GGUF writer does not produce",
            examples=("llava-hf/llava-v1.6-mistral-7b-hf",),
        ),
        Family(
            name="qwen2_5_vl", title="Qwen2.5-VL / Qwen2-VL, dynamic resolution",
            model_types=("qwen2_5_vl", "qwen2_vl"), hf_class="Qwen2_5_VLForConditionalGeneration",
            vision_tower="model.visual", connector=("model.visual.merger",),
            language_model="model.language_model", image_tokens="dynamic", image_token="<|image_pad|>",
            image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
            image_sequence="<|vision_start|>{image}<|vision_end|>", turn_end="<|im_end|>",
            templates=(CHAT_TEMPLATE,), batch_keys=("pixel_values", "image_grid_thw"), image_side=448,
            side_multiple=28,
            padding_free="Qwen's 3-D mRoPE positions are computed per sequence from the image grid; packed "
            "rows would get one row's positions",
            gguf="the kit's GGUF writer knows the LLaVA (CLIP + MLP projector) layout only",
            examples=("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"),
        ),
        Family(
            name="gemma3", title="Gemma 3", model_types=("gemma3",),
            hf_class="Gemma3ForConditionalGeneration", vision_tower="model.vision_tower",
            connector=("model.multi_modal_projector",), language_model="model.language_model",
            image_tokens="fixed", image_token="<image_soft_token>", image_placeholder="<start_of_image>",
            image_sequence="\n\n<start_of_image>{image}<end_of_image>\n\n", turn_end="<end_of_turn>",
            templates=(CHAT_TEMPLATE,), token_type_ids=True,
            padding_free="Gemma 3 attends bidirectionally within each image (token_type_ids); packed rows "
            "would need that mask per row",
            gguf="the kit's GGUF writer knows the LLaVA (CLIP + MLP projector) layout only",
            examples=("google/gemma-3-4b-it",),
        ),
    )
}
# Qwen2-VL has its own class; everything else is the same as Qwen2.5-VL.
HF_CLASS_BY_TYPE = {"qwen2_vl": "Qwen2VLForConditionalGeneration"}
BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}

ADD_A_FAMILY = (
    "to add one, write its Family entry in qlora_med/config/families.py (module paths, image tokens, templates) "
    "and a tiny builder in qlora_med/model/tiny.py"
)


def supported() -> str:
    """The families as one line: ``llava (LLaVA 1.5 ...), ...``."""
    return ", ".join(f"{f.name} (model_type {'/'.join(f.model_types)}: {f.title})" for f in FAMILIES.values())


def family_of(model_type: str | None, where: str = "model") -> Family:
    """The family of a config.json ``model_type``; one ConfigError line listing the supported ones otherwise."""
    if model_type in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[model_type]
    found = f"model_type '{model_type}'" if model_type else "no model_type"
    raise ConfigError(f"{where}: {found} is not a supported VLM family; supported: {supported()}; {ADD_A_FAMILY}")


def hf_class_name(model_type: str) -> str:
    """The transformers class that loads ``model_type``."""
    return HF_CLASS_BY_TYPE.get(model_type) or family_of(model_type).hf_class


def check_template(family: Family, template: str, where: str) -> str | None:
    """Why ``template`` does not fit ``family`` (one problem line), or None."""
    if template in family.templates:
        return None
    return (
        f"{where}.template: '{template}' is not a {family.title} format; {family.name} takes "
        f"{', '.join(family.templates)} ('{CHAT_TEMPLATE}': the model's own chat template)"
    )


def check_image_side(family: Family, side: int | None, where: str = "model.image_size") -> str | None:
    """Why ``model.image_size`` does not suit ``family``, or None."""
    if side is None:
        return None
    if family.image_tokens == "fixed":
        return f"{where}: {family.name} takes images at its tower's own size; remove {where}"
    if side <= 0 or side % family.side_multiple:
        return f"{where}: {side} must be a positive multiple of {family.side_multiple} for {family.name}"
    return None
