"""The family table (:mod:`qlora_med.config.families`) applied to a loaded model and processor: which family a
model is, its connector modules, the processor (with a fallback where transformers cannot build one), and how
many tokens each image becomes.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import ProcessorMixin

from qlora_med.config.families import Family, family_of

logger = logging.getLogger(__name__)


def family_of_config(config) -> Family:
    """The family of a transformers config (or a PEFT / wrapped model's config)."""
    return family_of(getattr(config, "model_type", None), where="model config.json")


def family_of_dir(folder: Path | str) -> Family:
    """The family of the model folder ``folder`` (its config.json)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return family_of(config.get("model_type"), where=f"'{folder}'")


def _strip_wrappers(name: str) -> str:
    """A module name without PEFT's ``base_model.model.`` prefix."""
    while name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name


def connector_parameters(model: torch.nn.Module, family: Family) -> dict[str, torch.nn.Parameter]:
    """The connector's parameters (the family's "projector") by full name, inside a possibly PEFT-wrapped model."""
    found = {}
    for name, param in model.named_parameters():
        bare = _strip_wrappers(name)
        if any(bare == path or bare.startswith(path + ".") for path in family.connector):
            found[name] = param
    if not found:
        raise ValueError(f"model has no {family.name} connector ({', '.join(family.connector)})")
    return found


def connector_modules(model: torch.nn.Module, family: Family) -> list[torch.nn.Module]:
    """The connector's modules (parameters such as LLaVA-NeXT's ``image_newline`` are not modules)."""
    return [m for name, m in model.named_modules() if _strip_wrappers(name) in family.connector]


class ImageTextProcessor(ProcessorMixin):
    """A tokenizer and an image processor where transformers cannot build the family's processor (Qwen2-VL's
    needs torchvision for its video processor): what training, evaluation and export use of a processor. A
    ``ProcessorMixin`` so that trainers take it as a VLM's processor; it saves as its two parts (and the chat
    template), so the folder loads as the family's own processor where torchvision is installed."""

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None, image_token: str = "") -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template or tokenizer.chat_template)
        self.image_token = image_token

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def save_pretrained(self, folder, **kwargs) -> None:
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        if self.chat_template:
            (folder / "chat_template.jinja").write_text(self.chat_template)


def load_processor(folder: Path | str, family: Family):
    """``AutoProcessor`` for ``folder``; without torchvision, a family whose processor needs it gets an
    :class:`ImageTextProcessor` of its tokenizer and image processor (logged)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(folder)
    except (AttributeError, ImportError) as err:  # transformers' video processors without torchvision
        if "VIDEO_PROCESSOR_MAPPING" not in str(err) and "Torchvision" not in str(err):
            raise
    chat_file = Path(folder) / "chat_template.jinja"
    chat = chat_file.read_text() if chat_file.is_file() else None
    logger.info(
        "%s processor: built from its tokenizer and image processor (transformers needs torchvision for its "
        "video processor; images only here)", family.name,
    )
    return ImageTextProcessor(
        AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), chat, family.image_token
    )


def _fixed_count(config) -> int:
    """LLaVA 1.5: a CLIP tower's patches (CLS dropped by the 'default' strategy)."""
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    return n + (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)


def tokens_from_config(config) -> int | None:
    """Tokens per image known from the config alone (fixed-size families), else None."""
    family = family_of_config(config)
    if family.image_tokens != "fixed":
        return None
    return config.mm_tokens_per_image if family.name == "gemma3" else _fixed_count(config)


def default_side(family: Family, processor) -> int | None:
    """The square side images are resized to when the recipe sets no ``model.image_size``: LLaVA-NeXT's largest
    square grid point (672 for 1.6), Qwen's :attr:`Family.image_side` within the processor's pixel limits."""
    if family.image_tokens == "fixed":
        return None
    ip = processor.image_processor
    if family.image_tokens == "anyres":
        squares = [h for h, w in ip.image_grid_pinpoints if h == w]
        return max(squares) if squares else family.image_side
    step = family.side_multiple  # Qwen's pixel budget: size = {shortest_edge: min_pixels, longest_edge: max_pixels}
    largest = int(math.isqrt(ip.size["longest_edge"])) // step * step
    smallest = math.ceil(math.sqrt(ip.size["shortest_edge"]) / step) * step
    return max(min(family.image_side, largest), smallest)


@dataclass(frozen=True)
class ImageSpec:
    """How this model's images become pixels and tokens: the square side they are resized to (None: the
    processor's own size), the tokens per image, and the batch keys the forward takes."""

    family: Family
    side: int | None
    tokens: int
    image_token_id: int

    @property
    def token(self) -> str:
        return self.family.image_token

    def describe(self) -> str:
        size = f"{self.side}x{self.side} px" if self.side else "the tower's size"
        return f"{self.family.name}: {self.tokens} tokens per image at {size}"


def image_spec(model_config, processor, side: int | None = None, image_token: str | None = None) -> ImageSpec:
    """The :class:`ImageSpec` of a model: ``side`` (``model.image_size``) or the family default; ``image_token``
    (``model.image_token``) replaces the family's where its templates write the image token itself (LLaVA)."""
    family = family_of_config(model_config)
    tokenizer = processor.tokenizer
    token = image_token if image_token and not family.image_placeholder else family.image_token
    image_id = tokenizer.convert_tokens_to_ids(token)
    if family.image_tokens == "fixed":
        return ImageSpec(family, None, tokens_from_config(model_config), image_id)
    side = side or default_side(family, processor)
    if family.image_tokens == "anyres":
        tokens = processor._get_num_multimodal_tokens(image_sizes=[[side, side]])["num_image_tokens"][0]
    else:
        ip = processor.image_processor
        tokens = ip.get_number_of_image_patches(side, side, {}) // ip.merge_size**2
    return ImageSpec(family, side, int(tokens), image_id)


LEGACY_PROJECTOR_PREFIX = "model.multi_modal_projector."  # projector.safetensors keys before the family table


def connector_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The connector's tensors by full module path (``model.multi_modal_projector.linear_1.weight``), on CPU."""
    family = family_of_config(model.config)
    return {_strip_wrappers(name): p.detach().contiguous().cpu()
            for name, p in connector_parameters(model, family).items()}


def normalise_connector_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full-path keys; a LLaVA run folder written before the family table keyed them inside the projector."""
    if state and not any(k.startswith("model.") for k in state):
        return {LEGACY_PROJECTOR_PREFIX + k: v for k, v in state.items()}
    return state


def load_connector_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved connector tensors into the live model (its dtypes kept); every connector tensor must be there."""
    family = family_of_config(model.config)
    params = {_strip_wrappers(n): p for n, p in connector_parameters(model, family).items()}
    state = normalise_connector_keys(state)
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"saved projector does not match the {family.name} connector: missing {missing}, "
                         f"unexpected {extra}")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise ValueError(f"projector {name}: saved shape {tuple(state[name].shape)} != model "
                                 f"{tuple(param.shape)}")
            param.copy_(state[name].to(param.dtype))


def chat_format(processor, spec: ImageSpec):
    """The model's chat template with the family's image and turn-end text, for template ``chat_template``;
    a ConfigError when the processor has none."""
    from qlora_med.errors import ConfigError
    from qlora_med.prompts.chat_render import ChatFormat

    tokenizer = processor.tokenizer
    jinja = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if isinstance(jinja, dict):
        jinja = jinja.get("default")
    if not jinja:
        raise ConfigError("template chat_template: the model's processor has no chat template; set the stage's "
                          "template to one of the kit's (e.g. llava_med_v15) or add chat_template.jinja to the model")
    family = spec.family
    image_token = tokenizer.convert_ids_to_tokens(spec.image_token_id)
    return ChatFormat(jinja, family.placeholder, family.image_sequence, image_token, family.turn_end,
                      tokenizer.bos_token or "", tokenizer.eos_token or "")
