"""GGUF export for llama.cpp: the LLM as one GGUF, the vision tower + projector as an ``mmproj`` GGUF.

Uses the ``gguf`` package (llama.cpp's gguf-py) for the file format and the tensor-name tables
(``get_tensor_name_map``); the tokenizer (SentencePiece scores and types, ``add_space_prefix``, special
ids, chat template) is :mod:`qlora_med.artifacts.gguf_vocab`; what else ``gguf`` does not do is here:

* the LLM (Mistral / Llama) in llama.cpp's ``llama`` architecture: HF's rotary layout of ``q_proj`` /
  ``k_proj`` is permuted to GGML's interleaved one (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``);
  the vocabulary is padded to the embedding rows with ``[PAD{i}]`` tokens.
* the ``mmproj`` file (``clip`` architecture, projector type ``mlp``) as llama.cpp's
  ``tools/mtmd/clip.cpp`` loads LLaVA-1.5: CLIP tensors ``v.*``, projector ``mm.0`` / ``mm.2``
  (``linear_1`` / ``linear_2``), no post-layernorm (LLaVA takes hidden states before it), and
  ``clip.vision.feature_layer`` set to the HF ``vision_feature_layer`` made non-negative
  (``-2`` -> ``n_layers - 1``: the encoder runs up to that layer, CLS dropped by the projector input).

Both files are written in two passes (tensor infos from the safetensors headers, then the data
tensor by tensor), so memory stays at one tensor.

Only LLaVA 1.5 is written: a family whose :attr:`~qlora_med.config.families.Family.gguf` gives a reason is refused in
one line (:func:`check_gguf_family`) before anything is merged or written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from qlora_med.artifacts.gguf_vocab import add_vocab
from qlora_med.artifacts.shards import canonical_key, weight_files
from qlora_med.errors import QloraMedError
from qlora_med.model.family import family_of_dir

logger = logging.getLogger(__name__)

_TYPES = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", None: "f16"}
_LLM_PREFIX, _VISION_PREFIX, _PROJ_PREFIX = "model.language_model.", "model.vision_tower.", "model.multi_modal_projector."


def check_gguf_family(model_dir: Path) -> None:
    """Refuse, in one line naming the family and why, a model (merged folder or base) the GGUF writer cannot hold."""
    family = family_of_dir(model_dir)
    if family.gguf:
        raise QloraMedError(f"export --format gguf: {family.name} ({family.title}) cannot be exported to GGUF: "
                            f"{family.gguf}; use `qlora-med export --format hf` for a merged transformers checkpoint "
                            "(or --format peft)")


def permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF (rotate-half) -> GGML (interleaved) row order of a q/k projection with ``n_head`` heads."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@dataclass
class _Entry:
    name: str
    shard: Path
    key: str
    shape: tuple[int, ...]
    qtype: str  # f32 | f16 | bf16
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def _ggml_type(qtype: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16}[qtype]


def _as_array(tensor: torch.Tensor, qtype: str) -> np.ndarray:
    import gguf

    data = tensor.float().numpy()
    if qtype == "f16":
        return data.astype(np.float16)
    if qtype == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16)
    return data


def _write(path: Path, writer, entries: list[_Entry]) -> None:
    """Pass 1: tensor infos; header, metadata; pass 2: the data, one tensor at a time."""
    for e in entries:
        n = int(np.prod(e.shape))
        nbytes = n * (4 if e.qtype == "f32" else 2)
        dtype = {"f32": np.float32, "f16": np.float16, "bf16": np.uint8}[e.qtype]
        shape = (*e.shape[:-1], e.shape[-1] * 2) if e.qtype == "bf16" else e.shape
        writer.add_tensor_info(e.name, shape, np.dtype(dtype), nbytes,
                               raw_dtype=_ggml_type(e.qtype) if e.qtype == "bf16" else None)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    handles: dict[Path, object] = {}
    try:
        for e in entries:
            if e.shard not in handles:
                handles.clear()  # entries are grouped by shard: one shard open at a time
                handles[e.shard] = safe_open(str(e.shard), framework="pt")
            tensor = handles[e.shard].get_tensor(e.key)
            if e.transform is not None:
                tensor = e.transform(tensor)
            writer.write_tensor_data(_as_array(tensor, e.qtype))
    finally:
        handles.clear()
        writer.close()


def _entries(merged: Path, select: Callable[[str, tuple[int, ...]], _Entry | None]) -> list[_Entry]:
    entries = []
    for shard in weight_files(merged):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                entry = select(key, tuple(handle.get_slice(key).get_shape()))
                if entry is not None:
                    entry.shard = shard
                    entries.append(entry)
    return entries


def write_llm(merged: Path, path: Path, qtype: str, name: str) -> Path:
    """The language model as a llama.cpp ``llama`` GGUF with its tokenizer."""
    import gguf

    text = json.loads((merged / "config.json").read_text())["text_config"]
    if text.get("model_type") not in ("mistral", "llama"):
        raise QloraMedError(f"GGUF export supports Mistral/Llama LLMs, not {text.get('model_type')}")
    n_layer, n_head = text["num_hidden_layers"], text["num_attention_heads"]
    n_kv = text.get("num_key_value_heads") or n_head
    head_dim = text.get("head_dim") or text["hidden_size"] // n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)

    def select(key: str, shape: tuple[int, ...]) -> _Entry | None:
        name = canonical_key(key)
        if name.startswith(_LLM_PREFIX):
            name = "model." + name[len(_LLM_PREFIX):]
        elif not name.startswith("lm_head."):
            return None
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise QloraMedError(f"GGUF export: no llama.cpp name for '{name}'")
        transform = None
        if name.endswith("q_proj.weight"):
            transform = lambda t: permute_rotary(t, n_head)  # noqa: E731
        elif name.endswith("k_proj.weight"):
            transform = lambda t: permute_rotary(t, n_kv)  # noqa: E731
        return _Entry(new, Path(), key, shape, qtype if len(shape) > 1 else "f32", transform)

    entries = _entries(merged, select)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[qtype])
    writer.add_context_length(text["max_position_embeddings"])
    writer.add_embedding_length(text["hidden_size"])
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(text["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != text["hidden_size"] // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(text.get("rms_norm_eps", 1e-6))
    rope = text.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", text.get("rope_theta", 10000.0))))
    vocab_size = text["vocab_size"]
    writer.add_vocab_size(vocab_size)
    add_vocab(writer, merged, vocab_size)
    _write(path, writer, entries)
    return path


def write_mmproj(merged: Path, path: Path, qtype: str, name: str) -> Path:
    """The CLIP vision tower + LLaVA projector as an ``mmproj`` GGUF (``clip`` arch, projector ``mlp``)."""
    import gguf
    from transformers import AutoProcessor

    config = json.loads((merged / "config.json").read_text())
    vision, text = config["vision_config"], config["text_config"]
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise QloraMedError("mmproj export needs the mlp2x_gelu projector (projector_hidden_act: gelu)")
    if config.get("vision_feature_select_strategy", "default") != "default":
        raise QloraMedError("mmproj export needs vision_feature_select_strategy 'default' (CLS dropped)")
    n_layer = vision["num_hidden_layers"]
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise QloraMedError("mmproj export supports one vision_feature_layer, not a list")
    feature_layer = layer if layer >= 0 else n_layer + layer + 1
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_layer)

    def select(key: str, shape: tuple[int, ...]) -> _Entry | None:
        name = canonical_key(key)
        if name.startswith(_PROJ_PREFIX):
            rest = name[len(_PROJ_PREFIX):]
            new = rest.replace("linear_1.", "mm.0.").replace("linear_2.", "mm.2.")
        elif name.startswith(_VISION_PREFIX):
            rest = name[len(_VISION_PREFIX):]
            if rest.startswith("post_layernorm."):
                return None
            hf = "vision_tower.vision_model." + rest
            new = names.get_name(hf) if rest.endswith("class_embedding") else names.get_name(
                hf, try_suffixes=(".weight", ".bias"))
        else:
            return None
        if new is None:
            raise QloraMedError(f"GGUF export: no mmproj name for '{name}'")
        if len(shape) == 4:  # conv kernel: F16 or F32 only (convert_hf_to_gguf's MmprojModel.tensor_force_quant)
            return _Entry(new, Path(), key, shape, "f16" if qtype == "f16" else "f32")
        return _Entry(new, Path(), key, shape, qtype if len(shape) > 1 else "f32")

    entries = _entries(merged, select)
    image_processor = AutoProcessor.from_pretrained(merged).image_processor
    writer = gguf.GGUFWriter(None, "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(f"{name} mmproj")
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[qtype])
    writer.add_clip_has_vision_encoder(True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_clip_projector_type("mlp")
    writer.add_vision_projection_dim(text["hidden_size"])
    writer.add_vision_image_size(vision["image_size"])
    writer.add_vision_patch_size(vision["patch_size"])
    writer.add_vision_embedding_length(vision["hidden_size"])
    writer.add_vision_feed_forward_length(vision["intermediate_size"])
    writer.add_vision_block_count(n_layer)
    writer.add_vision_head_count(vision["num_attention_heads"])
    writer.add_vision_attention_layernorm_eps(vision.get("layer_norm_eps", 1e-5))
    writer.add_vision_image_mean(list(image_processor.image_mean))
    writer.add_vision_image_std(list(image_processor.image_std))
    writer.add_vision_use_gelu(vision.get("hidden_act") == "gelu")  # CLIP's quick_gelu is clip.cpp's default
    writer.add_array("clip.vision.feature_layer", [feature_layer])
    _write(path, writer, entries)
    return path


def export_gguf(merged: Path, out: Path, dtype: str | None = None, name: str | None = None) -> list[Path]:
    """Write ``llm-<type>.gguf`` and ``mmproj-<type>.gguf`` (plus the README) to ``out``."""
    check_gguf_family(merged)
    qtype = _TYPES[dtype]
    logging.getLogger("gguf").setLevel(max(logging.WARNING, logging.getLogger().level))  # it logs the whole template
    out.mkdir(parents=True, exist_ok=True)
    name = name or out.name
    llm = write_llm(merged, out / f"llm-{qtype}.gguf", qtype, name)
    mmproj = write_mmproj(merged, out / f"mmproj-{qtype}.gguf", qtype, name)
    logger.info("GGUF: %s (%.1f MB), %s (%.1f MB)", llm.name, llm.stat().st_size / 1e6, mmproj.name,
                mmproj.stat().st_size / 1e6)
    return [llm, mmproj]
