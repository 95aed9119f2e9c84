"""Load what training produced (a run, a stage's ``final/``, a checkpoint, or a merged model) for generation."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from qlora_med.artifacts.adapter import load_projector
from qlora_med.artifacts.run_dir import ADAPTER_FILE, META_FILE, resolve_trained, stage_info
from qlora_med.config.schema import ModelConfig
from qlora_med.model.load import load_model, resolve_compute_dtype

logger = logging.getLogger(__name__)


def model_folder(path: str | Path) -> Path:
    """``path`` as a local folder: a Hub model id is downloaded into the HF cache, and LLaVA's original layout
    (e.g. microsoft/llava-med-v1.5-mistral-7b) is converted once, so the released models load like merged ones."""
    from qlora_med.config.model_ref import parse_model_ref
    from qlora_med.model.original import ensure_hf_layout, hub_tower_resolver
    from qlora_med.model.source import resolve_model

    ref = parse_model_ref(str(path), key="--model")
    folder = ref.path if ref.path is not None else resolve_model(str(path), key="--model", role="llava")
    cache = Path(next(f.default for f in dataclasses.fields(ModelConfig) if f.name == "cache_dir"))
    return ensure_hf_layout(Path(folder), cache, hub_tower_resolver())


def trained_folder(path: str | Path) -> Path:
    """The folder :func:`load_trained` loads for ``path``: a stage output, a merged model, or a base model
    (a Hub id or an original-layout release, converted)."""
    return resolve_trained(model_folder(path))


def folder_processor(folder: Path, family):
    """:func:`qlora_med.model.family.load_processor` of ``folder``, also where it is a stage's ``final/``: processor
    files without config.json, where ``AutoProcessor`` cannot tell the family and, for a processor saved as tokenizer
    + image processor (Qwen2-VL's, see ``ImageTextProcessor``), returns the bare tokenizer. That gets the image
    processor beside it (and the saved chat template) back."""
    from transformers import AutoImageProcessor

    from qlora_med.model.family import ImageTextProcessor, load_processor

    processor = load_processor(folder, family)
    if hasattr(processor, "image_processor"):
        return processor
    chat_file = Path(folder) / "chat_template.jinja"
    logger.info("%s: processor built from its tokenizer and image processor", folder)
    return ImageTextProcessor(AutoImageProcessor.from_pretrained(folder), processor,
                              chat_file.read_text() if chat_file.is_file() else None, family.image_token)


def load_trained(path: str | Path, compute_dtype: str = "auto", quantization: str | None = None):
    """Return ``(model, processor, info)`` ready for generation (eval mode).

    ``info`` holds at least ``template`` and ``image_aspect``. A merged model loads directly, with its family's
    transformers class (:func:`qlora_med.config.families.hf_class_name`) and processor
    (:func:`qlora_med.model.family.load_processor`);
    a stage output loads its base (quantized as in training unless ``quantization`` says
    otherwise, computing in the dtype it trained in unless ``compute_dtype`` names one), applies the adapter
    and the trained projector.
    """
    import transformers

    from qlora_med.config.families import CHAT_TEMPLATE, hf_class_name
    from qlora_med.model.family import family_of_dir, load_processor

    src = trained_folder(path)
    if (src / "config.json").is_file():
        dtype = resolve_compute_dtype(compute_dtype)
        meta_file = src / META_FILE
        info = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        family = family_of_dir(src)  # one line naming the supported families for any other model_type
        # a base without qlora_med.json: LLaVA 1.5 releases have no chat template, the others bring their own
        info.setdefault("template", "mistral_instruct" if family.name == "llava" else CHAT_TEMPLATE)
        info.setdefault("image_aspect", "pad")
        model_type = json.loads((src / "config.json").read_text())["model_type"]
        model = getattr(transformers, hf_class_name(model_type)).from_pretrained(src, dtype=dtype)
        return model.eval(), load_processor(src, family), info
    info = stage_info(src)
    if compute_dtype == "auto" and info.get("compute_dtype"):
        dtype = getattr(torch, info["compute_dtype"])  # stage.json: the torch name training used
        logger.info("compute dtype: %s (as trained)", dtype)
    else:
        dtype = resolve_compute_dtype(compute_dtype)
    cfg = ModelConfig(name_or_path=info["base_model"], quantization=quantization or info["quantization"])
    model, processor = load_model(cfg, Path(info["base_model"]), dtype)
    if (src / ADAPTER_FILE).is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, src)
    load_projector(model, src)
    if (src / "tokenizer_config.json").is_file():  # the stage's processor: the training chat template
        processor = folder_processor(src, family_of_dir(info["base_model"]))
    logger.info("loaded trained model from %s (stage %s)", src, info.get("stage"))
    return model.eval(), processor, info
