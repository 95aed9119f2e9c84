"""Merge a trained stage (LoRA adapter + projector) into a full-precision HF checkpoint of its family.

The merge math, for every adapted linear layer with frozen base weight ``W`` (d_out x d_in), LoRA
factors ``A`` (r x d_in) and ``B`` (d_out x r), and scale ``s = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA)::

    W_merged = W_base + s * (B @ A)        # in fp32, then cast to the output dtype

``W_base`` is one of:

* ``original`` (default): the base checkpoint's full-precision ``W``. The trained model computed
  ``x @ W_nf4.T + s * (x @ A.T) @ B.T`` with ``W_nf4 = dequant(quant_nf4(W))``; the merged model
  differs from it by ``x @ (W - W_nf4).T``, the NF4 rounding error the adapter was trained around.
  This is the usual "merge into the bf16 base" deployment; the error is measured in the tests.
* ``nf4_faithful``: ``W_nf4`` itself (bitsandbytes blockwise NF4 quantize + dequantize of
  ``W.to(compute_dtype)``, bitsandbytes' default blocksize and the recipe's double-quant, as
  ``from_pretrained(quantization_config=...)`` did in training), applied to *every* NF4-quantized
  layer, adapted or not. The merged model then reproduces the evaluated adapter model up to float
  rounding, at the cost of keeping the 4-bit rounding of the base in 16-bit weights.

Everything else (embeddings, norms, lm_head, vision tower) is copied; the connector (the family's "projector":
LLaVA's ``multi_modal_projector``, LLaVA-NeXT's plus ``image_newline``, Qwen's ``visual.merger``, Gemma 3's
``multi_modal_projector``) is replaced by the trained ``projector.safetensors``, keyed by full module path (LLaVA
runs written before the family table keyed it inside the projector; both merge). The config and the model class come
from the base (:mod:`qlora_med.config.families`). For LLaVA 1.5 the processor saved with it pads non-square images to
a square itself (:func:`padding_processor`), so plain transformers preprocesses images as training did; the other
families keep the processor as saved, and the model card says how training padded and resized the images (to
``image_size``, recorded in ``qlora_med.json``). The merge streams: one input shard is read (``safe_open``),
transformed tensor by tensor into an output buffer that is written whenever it reaches
``max_shard_size`` (2 GB by default), so peak memory is about one input shard plus one output shard
(``benchmarks/merge_memory.py`` measures it). Keys keep the base checkpoint's on-disk names.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qlora_med.artifacts.card import write_card
from qlora_med.artifacts.run_dir import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    META_FILE,
    PROJECTOR_FILE,
    resolve_trained,
    saved_recipe,
    stage_chain,
    stage_info,
)
from qlora_med.artifacts.shards import ShardWriter, canonical_key, parse_size, weight_files
from qlora_med.config.families import Family, hf_class_name
from qlora_med.errors import QloraMedError
from qlora_med.io import atomic_dir
from qlora_med.model.family import default_side, family_of_dir, normalise_connector_keys
from qlora_med.model.load import DTYPES
from qlora_med.model.processor import CLIP_PROCESSORS, image_processor_as
from qlora_med.prompts.chat_template import set_chat_template

logger = logging.getLogger(__name__)


@dataclass
class LoraDelta:
    """The LoRA factors ``(A, B)`` of one adapter, keyed by canonical weight name, and its scale ``s``."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float

    def delta(self, key: str) -> torch.Tensor:
        a, b = self.factors[key]
        return self.scale * (b.float() @ a.float())


def load_lora(src: Path) -> LoraDelta | None:
    """Read ``adapter_model.safetensors`` + ``adapter_config.json`` (None when the stage has no adapter)."""
    if not (src / ADAPTER_FILE).is_file():
        return None
    cfg = json.loads((src / ADAPTER_CONFIG_FILE).read_text())
    if cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise QloraMedError(f"{src}: DoRA / per-module rank or alpha patterns are not supported by merge")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(src / ADAPTER_FILE)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if match is None:
            raise QloraMedError(f"{src}: unexpected adapter tensor '{key}' (only LoRA A/B on linear layers merge)")
        parts.setdefault(canonical_key(match.group(1)) + ".weight", {})[match.group(2)] = value
    factors = {k: (v["A"], v["B"]) for k, v in parts.items()}
    return LoraDelta(factors, scale)


def nf4_roundtrip(weight: torch.Tensor, compute_dtype: torch.dtype, double_quant: bool) -> torch.Tensor:
    """``dequant(quant_nf4(W))`` as bitsandbytes' ``Params4bit`` does it when the model loads."""
    import bitsandbytes.functional as bnbf

    from qlora_med.patches import bnb_cpu

    bnb_cpu.install()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = weight.to(device=device, dtype=compute_dtype).contiguous()
    packed, state = bnbf.quantize_4bit(w, compress_statistics=double_quant, quant_type="nf4",
                                       quant_storage=torch.uint8)
    return bnbf.dequantize_4bit(packed, state).cpu()


def quantized_linear_weights(base_dir: Path) -> set[str]:
    """Canonical names of the weights that training loaded as NF4 (LLM linears; the family's quant_skip kept)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = getattr(transformers, hf_class_name(config.model_type))(config)
    skip = tuple(family_of_dir(base_dir).quant_skip)
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skip)}


def padding_processor(processor, image_aspect: str):
    """``processor`` with an image processor that pads to a square itself when the model trained with
    ``image_aspect: pad``, so that plain transformers (``AutoProcessor`` + ``apply_chat_template``) computes the
    training pixels.

    transformers' ``LlavaImageProcessor(do_pad=True)`` is LLaVA's ``expand2square``: the image centred on a square of
    ``int(mean * 255)``, then the CLIP resize / centre crop (a no-op on a square) / normalise, in the backend (PIL or
    torchvision) of the processor training used. ``crop`` models, and image processors that are not CLIP's, keep
    their processor (logged).
    """
    from qlora_med.data.images import mean_colour

    image_processor = processor.image_processor
    if image_aspect != "pad":
        return processor
    if type(image_processor).__name__ not in CLIP_PROCESSORS:
        logger.warning("image processor %s is not CLIP's: the saved processor does not pad to a square; pad non-square "
                       "images with the mean colour %s yourself", type(image_processor).__name__,
                       mean_colour(image_processor))
        return processor
    padding = image_processor_as(image_processor, "Llava", do_pad=True)
    theirs = tuple(int(m * 255) for m in padding.image_mean)
    if mean_colour(image_processor) != theirs:
        logger.warning("the saved image processor pads with %s (LLaVA's int(mean * 255)); training padded with %s: the "
                       "borders of non-square images differ from training", theirs, mean_colour(image_processor))
    processor.image_processor = padding
    return processor


def clip_processor(image_processor):
    """A padding image processor (:func:`padding_processor`) back as CLIP's, for code that pads itself (LLaVA)."""
    if not type(image_processor).__name__.startswith("LlavaImageProcessor"):
        return image_processor
    return image_processor_as(image_processor, "CLIP")


@dataclass
class MergeOptions:
    """How to merge: output dtype (None: the base's), base weights, shard size, base location."""

    dtype: str | None = None
    base_model: str | None = None  # the base dir when it moved since training (default: stage.json's)
    nf4_faithful: bool = False
    max_shard_size: str | int = "2GB"
    overwrite: bool = False


@dataclass
class MergeResult:
    """What a merge wrote, with the numbers worth logging."""

    out: Path
    source: Path
    mode: str
    dtype: str
    shards: list[str]
    total_bytes: int
    merged_layers: int
    nf4_layers: int
    delta_rel_norm: float  # mean ||s*B@A|| / ||W|| over adapted layers
    seconds: float
    stages: list[dict] = field(default_factory=list)


def _base_dtype(base_dir: Path) -> str:
    config = json.loads((base_dir / "config.json").read_text())
    if config.get("quantization_config"):
        raise QloraMedError(f"{base_dir}: the base checkpoint is quantized; merge needs full-precision base weights")
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"bfloat16": "bf16", "float16": "fp16"}.get(name, "fp32")


def merge_weights(src: Path, base_dir: Path, out: Path, options: MergeOptions, info: dict) -> MergeResult:
    """Stream the base shards through the merge into ``out`` (weights only)."""
    dtype_name = options.dtype or _base_dtype(base_dir)
    dtype = DTYPES[dtype_name]
    lora = load_lora(src)
    projector = normalise_connector_keys(load_file(src / PROJECTOR_FILE))  # full module paths
    faithful = options.nf4_faithful
    if faithful and info.get("quantization") != "nf4":
        raise QloraMedError(f"--nf4-faithful: the stage was trained with quantization={info.get('quantization')}, not nf4")
    nf4_names = quantized_linear_weights(base_dir) if faithful else set()
    compute_dtype = getattr(torch, info.get("compute_dtype", "float32"))
    double_quant = bool((saved_recipe(src).get("model") or {}).get("double_quant", True))
    pending = set(lora.factors) if lora else set()
    pending_projector = set(projector)
    writer = ShardWriter(out, parse_size(options.max_shard_size))
    start, rel_norms, nf4_count = time.time(), [], 0
    for shard in weight_files(base_dir):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                tensor = handle.get_tensor(key)
                name = canonical_key(key)
                if name in pending_projector:
                    new = projector[name]
                    if new.shape != tensor.shape:
                        raise QloraMedError(f"projector {name}: trained shape {tuple(new.shape)} != base {tuple(tensor.shape)}")
                    tensor = new
                    pending_projector.discard(name)
                if name in nf4_names:
                    tensor = nf4_roundtrip(tensor, compute_dtype, double_quant)
                    nf4_count += 1
                if lora is not None and name in lora.factors:
                    delta = lora.delta(name)
                    if delta.shape != tensor.shape:
                        raise QloraMedError(f"adapter {name}: delta {tuple(delta.shape)} != weight {tuple(tensor.shape)}")
                    weight = tensor.float()
                    rel_norms.append((delta.norm() / weight.norm().clamp_min(1e-12)).item())
                    tensor = weight.add_(delta)
                    pending.discard(name)
                # copy=True: a tensor read from the shard may be a view of its mmap, which would keep the whole
                # input shard resident for as long as the output buffer holds the view
                writer.add(key, tensor.to(dtype, copy=True) if tensor.is_floating_point() else tensor.clone())
                del tensor
        logger.info("merged %s", shard.name)
    if pending or pending_projector:
        missing = sorted(pending | pending_projector)
        raise QloraMedError(f"{base_dir}: no base weight for {len(missing)} trained tensors, e.g. {missing[:3]} "
                            "(is stage.json's base_model the model this stage was trained on?)")
    if lora is not None and rel_norms and max(rel_norms) == 0.0:
        logger.warning("the LoRA adapter is all zeros (lora_B untrained?): the merge changes only the projector")
    shards = writer.finish()
    return MergeResult(
        out=out, source=src, mode="nf4-faithful" if faithful else "original", dtype=dtype_name, shards=shards,
        total_bytes=writer.total, merged_layers=len(rel_norms), nf4_layers=nf4_count,
        delta_rel_norm=sum(rel_norms) / len(rel_norms) if rel_norms else 0.0, seconds=time.time() - start,
    )


def _write(path: Path, text: str) -> None:
    path.write_text(text)  # inside an atomic_dir: the whole directory appears at once


def saved_processor(src: Path, base_dir: Path, family: Family, info: dict):
    """The processor a merged or exported model ships (the stage's, else the base's) with the training chat template,
    and the ``qlora_med.json`` fields that describe its prompts and images.

    LLaVA 1.5 trained with ``image_aspect: pad`` gets the image processor that pads to a square itself
    (:func:`padding_processor`). Other families keep their processor as saved: training padded (or cropped) each image
    to a square and, for any-res / dynamic families, resized it to ``image_size`` px (the recipe's
    ``model.image_size``, else the family default) before it; the card documents that.
    """
    from qlora_med.artifacts.load import folder_processor

    processor = folder_processor(src if (src / "tokenizer_config.json").is_file() else base_dir, family)
    image_token = getattr(processor, "image_token", None) or family.image_token
    set_chat_template(processor, info["template"], image_token)
    aspect = info.get("image_aspect", "pad")
    if family.name == "llava":
        processor = padding_processor(processor, aspect)
    side = info.get("image_size") or default_side(family, processor)
    meta = {"template": info["template"], "image_aspect": aspect, "image_token": image_token, "family": family.name,
            "image_size": side}
    return processor, meta


def write_support_files(src: Path, base_dir: Path, out: Path, result: MergeResult, info: dict, name: str) -> None:
    """config, generation config, processor (trained chat template; LLaVA 1.5: the padding image processor),
    qlora_med.json, README."""
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = str(DTYPES[result.dtype]).removeprefix("torch.")
    _write(out / "config.json", json.dumps(config, indent=2) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy(base_dir / "generation_config.json", out / "generation_config.json")
    processor, meta = saved_processor(src, base_dir, family_of_dir(base_dir), info)
    processor.save_pretrained(out)
    meta = {**meta, "source": str(src.resolve()), "base_model": str(base_dir), "merge": result.mode,
            "dtype": result.dtype, "stages": result.stages}
    _write(out / META_FILE, json.dumps(meta, indent=1) + "\n")
    write_card(out, src, kind="merged", repo=name)


def merge(path: str | Path, out: Path, options: MergeOptions | None = None) -> MergeResult:
    """Merge the stage at ``path`` (run dir, ``final/`` or ``checkpoint-N/``) into the HF dir ``out``."""
    options = options or MergeOptions()
    src = resolve_trained(path)
    if (src / "config.json").is_file():
        raise QloraMedError(f"{src} is already a merged model")
    info = stage_info(src)
    base_dir = Path(options.base_model or info["base_model"])
    if not (base_dir / "config.json").is_file():
        raise QloraMedError(f"{src}: base model {base_dir} (stage.json base_model) is missing; "
                            "pass --base DIR if it moved")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not options.overwrite:
        raise QloraMedError(f"{out} exists and is not empty; pass --overwrite to replace it")
    logger.info("merging %s into %s (%s base weights)", src, base_dir,
                "NF4-round-tripped" if options.nf4_faithful else "original")
    with atomic_dir(out) as tmp:
        result = merge_weights(src, base_dir, tmp, options, info)
        result.stages = [_stage_summary(s) for s in stage_chain(src)]
        write_support_files(src, base_dir, tmp, result, info, out.name)
    result.out = out
    logger.info("wrote %s: %d shard(s), %.1f MB %s, %d LoRA layers merged (mean |sBA|/|W| %.4f), %d NF4 "
                "round-trips, %.1f s", out, len(result.shards), result.total_bytes / 1e6, result.dtype,
                result.merged_layers, result.delta_rel_norm, result.nf4_layers, result.seconds)
    return result


def _stage_summary(info: dict) -> dict:
    keys = ("stage", "kind", "template", "train", "lora", "quantization", "compute_dtype", "loss_first",
            "loss_last", "steps", "samples", "wall_time_s", "hardware")
    return {k: info.get(k) for k in keys}
