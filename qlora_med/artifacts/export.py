"""Export a trained run as a PEFT adapter, a merged HF checkpoint, an original LLaVA-Med v1.5 checkpoint, or GGUF.

* ``peft``: ``adapter_model.safetensors`` + ``adapter_config.json`` (loads with
  ``PeftModel.from_pretrained`` on the base, with the family's transformers class), ``projector.safetensors``
  (the connector by full module path), processor files with the training chat template (for LLaVA 1.5 an image
  processor that pads like training, see :func:`qlora_med.artifacts.merge.padding_processor`), and a README whose
  code rebuilds the trained model.
* ``hf``: a transformers checkpoint of any family: a run or stage output is merged (as ``qlora-med merge``), a merged
  folder copied, and a ``llava-med`` export converted back to an HF LLaVA dir (:func:`llava_med_to_hf`).
* ``llava-med`` (LLaVA 1.5 only): the layout of ``microsoft/llava-med-v1.5-mistral-7b`` (LLaVA's ``llava_mistral``):
  LLM keys ``model.*`` / ``lm_head.weight``, projector ``model.mm_projector.{0,2}.*`` (``mlp2x_gelu``),
  vision tower ``model.vision_tower.vision_tower.vision_model.*`` (LLaVA-Med checkpoints carry it;
  its code loads the tower by the name in ``mm_vision_tower``), and a config with the ``mm_*`` keys of
  ``llava/model/llava_arch.py``. The HF config is kept under ``qlora_med_hf_config`` so
  :func:`llava_med_to_hf` restores the HF checkpoint tensor for tensor.
* ``gguf`` (LLaVA 1.5 only): see :mod:`qlora_med.artifacts.gguf`.

Other families are refused in one line for ``llava-med`` and ``gguf`` (:func:`check_family`), before anything is
merged. ``llava-med`` and ``gguf`` start from a merged model; given a run, they merge it first (to a
temporary directory next to ``out``), onto the original base or, with ``nf4_faithful``, onto the
NF4-round-tripped one (the weights training and evaluation saw); the README says which.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qlora_med.artifacts.card import write_card
from qlora_med.artifacts.gguf import check_gguf_family, export_gguf
from qlora_med.artifacts.merge import MergeOptions, clip_processor, merge, saved_processor
from qlora_med.artifacts.run_dir import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    META_FILE,
    PROJECTOR_FILE,
    resolve_trained,
    stage_chain,
    stage_info,
)
from qlora_med.artifacts.shards import ShardWriter, canonical_key, parse_size, weight_files
from qlora_med.errors import QloraMedError
from qlora_med.io import atomic_dir
from qlora_med.model.family import family_of_dir, normalise_connector_keys

logger = logging.getLogger(__name__)

FORMATS = ("peft", "llava-med", "gguf", "hf")
HF_CONFIG_KEY = "qlora_med_hf_config"
_LLAVA_ARCH = {"mistral": ("llava_mistral", "LlavaMistralForCausalLM"), "llama": ("llava_llama", "LlavaLlamaForCausalLM")}
# canonical (transformers 5 in-memory) prefix <-> LLaVA-Med prefix, most specific first
_LLAVA_MED_PREFIXES = [
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
]
# canonical -> transformers 5 on-disk LLaVA names (what save_pretrained writes)
_HF_DISK_PREFIXES = [
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


def _swap_prefix(key: str, table: list[tuple[str, str]], reverse: bool = False) -> str:
    for a, b in table:
        old, new = (b, a) if reverse else (a, b)
        if key.startswith(old):
            return new + key[len(old):]
    raise QloraMedError(f"tensor '{key}' does not belong to a LLaVA checkpoint (no known prefix)")


def to_llava_med_key(hf_key: str) -> str:
    """HF LLaVA checkpoint key (any on-disk layout) -> LLaVA-Med key."""
    return _swap_prefix(canonical_key(hf_key), _LLAVA_MED_PREFIXES)


def from_llava_med_key(key: str) -> str:
    """LLaVA-Med key -> transformers 5 on-disk LLaVA key."""
    return _swap_prefix(_swap_prefix(key, _LLAVA_MED_PREFIXES, reverse=True), _HF_DISK_PREFIXES)


def convert_weights(src: Path, out: Path, rename: Callable[[str], str], max_shard_size: str | int = "2GB") -> list[str]:
    """Stream every tensor of ``src``'s shards into ``out`` under a new name (values untouched)."""
    writer = ShardWriter(out, parse_size(max_shard_size))
    for shard in weight_files(src):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                writer.add(rename(key), handle.get_tensor(key).clone())  # clone: release the shard's mmap
    return writer.finish()


@dataclass
class ExportOptions:
    """Options of ``qlora-med export``."""

    format: str
    dtype: str | None = None
    nf4_faithful: bool = False  # llava-med, gguf from a run: merge onto the NF4-round-tripped base (see merge)
    base_model_id: str | None = None
    vision_tower_name: str | None = None
    max_shard_size: str = "2GB"
    overwrite: bool = False


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise QloraMedError(f"{out} exists and is not empty; pass --overwrite to replace it")


def export_peft(source: str | Path, out: Path, options: ExportOptions) -> Path:
    """The adapter + projector of a stage, loadable with PEFT on the base (the family's transformers class)."""
    src = resolve_trained(source)
    if (src / "config.json").is_file() or not (src / ADAPTER_FILE).is_file():
        raise QloraMedError(f"{src}: --format peft needs a stage output with a LoRA adapter (a run, final/ or checkpoint-N/)")
    info = stage_info(src)
    if not (Path(info["base_model"]) / "config.json").is_file():
        raise QloraMedError(f"{src}: base model {info['base_model']} (stage.json base_model) is missing; the export "
                            "reads its family and processor from it")
    family = family_of_dir(info["base_model"])
    with atomic_dir(out) as tmp:
        shutil.copy(src / ADAPTER_FILE, tmp / ADAPTER_FILE)
        # full module paths, also for a LLaVA run written before the family table (keys inside the projector)
        projector = normalise_connector_keys(load_file(src / PROJECTOR_FILE))
        save_file(projector, tmp / PROJECTOR_FILE, metadata={"format": "pt"})
        adapter_cfg = json.loads((src / ADAPTER_CONFIG_FILE).read_text())
        adapter_cfg["base_model_name_or_path"] = options.base_model_id or info["base_model"]
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_cfg, indent=2) + "\n")
        processor, meta = saved_processor(src, Path(info["base_model"]), family, info)
        processor.save_pretrained(tmp)
        meta = {**meta, "source": str(src.resolve()), "base_model": adapter_cfg["base_model_name_or_path"],
                "format": "peft", "stages": [s.get("stage") for s in stage_chain(src)]}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        write_card(tmp, src, kind="peft", repo=out.name)
    return out


def llava_med_config(hf_config: dict, image_aspect: str, vision_tower: str) -> dict:
    """config.json of an original LLaVA-Med v1.5 checkpoint (``llava_mistral``) for an HF LLaVA config."""
    text, vision = dict(hf_config["text_config"]), hf_config["vision_config"]
    if text.get("model_type") not in _LLAVA_ARCH:
        raise QloraMedError(f"llava-med export supports Mistral/Llama LLMs, not {text.get('model_type')}")
    if hf_config.get("projector_hidden_act", "gelu") != "gelu":
        raise QloraMedError("llava-med export needs the mlp2x_gelu projector (projector_hidden_act: gelu)")
    model_type, arch = _LLAVA_ARCH[text.pop("model_type")]
    rope = text.get("rope_parameters") or {}
    if "rope_theta" in rope:
        text.setdefault("rope_theta", rope["rope_theta"])  # transformers 4 (LLaVA-Med's) reads rope_theta
    for key in ("architectures", "dtype", "torch_dtype", "transformers_version"):
        text.pop(key, None)
    return {
        **text,
        "architectures": [arch], "model_type": model_type,
        "torch_dtype": hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32",
        "mm_vision_tower": vision_tower, "mm_hidden_size": vision["hidden_size"],
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": hf_config.get("vision_feature_layer", -2),
        "mm_vision_select_feature": "patch" if hf_config.get("vision_feature_select_strategy") == "default" else "cls_patch",
        "mm_patch_merge_type": "flat", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad" if image_aspect == "pad" else "square", "use_mm_proj": True,
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": False,
        "tokenizer_padding_side": "right", "use_cache": True,
        HF_CONFIG_KEY: hf_config,
    }


def _write_vision_tower(merged: Path, out: Path, hf_config: dict) -> None:
    """A CLIPVisionModel dir (config, weights ``vision_model.*``, image processor) for ``mm_vision_tower``."""
    from transformers import AutoProcessor

    config = {**hf_config["vision_config"], "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model"}
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    prefix = "model.vision_tower."

    def rename(key: str) -> str:
        return "vision_model." + canonical_key(key)[len(prefix):]

    writer = ShardWriter(out, parse_size("2GB"))
    for shard in weight_files(merged):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                if canonical_key(key).startswith(prefix):
                    writer.add(rename(key), handle.get_tensor(key).clone())
    writer.finish()
    clip_processor(AutoProcessor.from_pretrained(merged).image_processor).save_pretrained(out)  # LLaVA pads itself


def hf_to_llava_med(merged: Path, out: Path, vision_tower_name: str | None = None,
                    max_shard_size: str = "2GB") -> Path:
    """Convert a merged HF LLaVA dir to the original LLaVA-Med layout (streams shard by shard)."""
    from transformers import AutoProcessor

    check_llava_med_family(merged)
    hf_config = json.loads((merged / "config.json").read_text())
    meta = json.loads((merged / META_FILE).read_text()) if (merged / META_FILE).is_file() else {}
    with atomic_dir(out) as tmp:
        convert_weights(merged, tmp, to_llava_med_key, max_shard_size)
        if vision_tower_name is None:
            _write_vision_tower(merged, tmp / "vision_tower", hf_config)
            vision_tower_name = str((out / "vision_tower").resolve())
            logger.info("mm_vision_tower = %s (absolute path; pass --vision-tower-name to name a Hub tower)",
                        vision_tower_name)
        config = llava_med_config(hf_config, meta.get("image_aspect", "pad"), vision_tower_name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        AutoProcessor.from_pretrained(merged).save_pretrained(tmp)  # tokenizer for LLaVA-Med; processor for the way back
        for name in ("generation_config.json", "README.md"):
            if (merged / name).is_file():
                shutil.copy(merged / name, tmp / name)
    return out


def llava_med_to_hf(src: Path, out: Path, max_shard_size: str = "2GB") -> Path:
    """Convert a LLaVA-Med export back to an HF LLaVA dir (needs the config written by the export)."""
    from transformers import AutoProcessor

    config = json.loads((src / "config.json").read_text())
    if HF_CONFIG_KEY not in config:
        raise QloraMedError(f"{src}/config.json has no '{HF_CONFIG_KEY}': only LLaVA-Med dirs written by "
                            "`qlora-med export --format llava-med` convert back (use model.vision_tower + model.llm "
                            "composition for other checkpoints)")
    with atomic_dir(out) as tmp:
        convert_weights(src, tmp, from_llava_med_key, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config[HF_CONFIG_KEY], indent=2) + "\n")
        AutoProcessor.from_pretrained(src).save_pretrained(tmp)
        for name in ("generation_config.json", "README.md"):
            if (src / name).is_file():
                shutil.copy(src / name, tmp / name)
        if (src / META_FILE).is_file():
            meta = json.loads((src / META_FILE).read_text())
            meta.pop("format", None)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def _merged_source(source: str | Path, out: Path, options: ExportOptions) -> tuple[Path, Path | None]:
    """A merged HF dir for ``source``: itself, or a temporary merge (returned second, for clean-up)."""
    src = resolve_trained(source)
    if (src / "config.json").is_file():
        mode = json.loads((src / META_FILE).read_text()).get("merge") if (src / META_FILE).is_file() else None
        if options.nf4_faithful and mode != "nf4-faithful":
            raise QloraMedError(f"{src} is already merged (merge: {mode or 'unknown'}); --nf4-faithful merges a run "
                                "onto the NF4-round-tripped base: pass the run (or its final/) instead")
        return src, None
    tmp = out.with_name(f".{out.name}.merged")
    shutil.rmtree(tmp, ignore_errors=True)
    merge(src, tmp, MergeOptions(dtype=options.dtype, nf4_faithful=options.nf4_faithful,
                                 max_shard_size=options.max_shard_size))
    return tmp, tmp


def check_llava_med_family(model_dir: Path) -> None:
    """Refuse, in one line, a model (merged folder or base) that is not LLaVA 1.5: the LLaVA-Med layout is its."""
    family = family_of_dir(model_dir)
    if family.name != "llava":
        raise QloraMedError(f"export --format llava-med: the original LLaVA-Med layout holds LLaVA 1.5 only, not "
                            f"{family.name} ({family.title}); use `qlora-med export --format hf` for a merged "
                            "transformers checkpoint (or --format peft)")


def check_family(source: str | Path, fmt: str) -> None:
    """Refuse, in one line, a format the source's family cannot take: GGUF where the kit's writer does not know the
    family (``Family.gguf``), the LLaVA-Med layout for anything but LLaVA 1.5. Reads config.json only."""
    src = resolve_trained(source)
    base = src if (src / "config.json").is_file() else Path(stage_info(src)["base_model"])
    if not (base / "config.json").is_file():
        return  # a base that moved: merge names it (and --base)
    if fmt == "gguf":
        check_gguf_family(base)
    elif fmt == "llava-med":
        check_llava_med_family(base)


def _is_llava_med(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and HF_CONFIG_KEY in json.loads(config.read_text())


def export_hf(source: str | Path, out: Path, options: ExportOptions) -> Path:
    """A transformers checkpoint of any family: a LLaVA-Med export converted back, a merged folder copied (as it is:
    ``dtype`` applies to a merge), a run or stage output merged (``options.dtype``, ``nf4_faithful`` and the shard
    size as for ``qlora-med merge``)."""
    if _is_llava_med(Path(source)):
        llava_med_to_hf(Path(source), out, options.max_shard_size)
        meta = json.loads((out / META_FILE).read_text()) if (out / META_FILE).is_file() else {}
        if meta.get("source") and Path(meta["source"]).is_dir():  # an HF model again: the transformers card
            write_card(out, Path(meta["source"]), kind="merged", repo=out.name)
        return out
    src = resolve_trained(source)
    if (src / "config.json").is_file():
        merged, _ = _merged_source(src, out, options)  # refuses --nf4-faithful on an original merge
        with atomic_dir(out) as tmp:
            shutil.copytree(merged, tmp, dirs_exist_ok=True)
            meta = json.loads((tmp / META_FILE).read_text()) if (tmp / META_FILE).is_file() else {}
            if meta.get("source") and Path(meta["source"]).is_dir():  # the card names the new folder
                write_card(tmp, Path(meta["source"]), kind="merged", repo=out.name)
        return out
    merge(src, out, MergeOptions(dtype=options.dtype, nf4_faithful=options.nf4_faithful,
                                 max_shard_size=options.max_shard_size, overwrite=options.overwrite))
    return out


def export(source: str | Path, out: str | Path, options: ExportOptions) -> list[Path]:
    """Export ``source`` (run, stage output, merged dir; a LLaVA-Med export for ``hf``) to ``out``."""
    out = Path(out)
    if options.format not in FORMATS:
        raise QloraMedError(f"unknown export format {options.format!r}; choose one of {list(FORMATS)}")
    _check_out(out, options.overwrite)
    if options.format == "peft":
        export_peft(source, out, options)
    elif options.format == "hf":
        export_hf(source, out, options)
    else:
        check_family(source, options.format)
        merged, temporary = _merged_source(source, out, options)
        try:
            if options.format == "llava-med":
                hf_to_llava_med(merged, out, options.vision_tower_name, options.max_shard_size)
            else:
                export_gguf(merged, out, options.dtype, out.name)
            meta = json.loads((merged / META_FILE).read_text()) if (merged / META_FILE).is_file() else {}
            (out / META_FILE).write_text(json.dumps({**meta, "format": options.format}, indent=1) + "\n")
            if meta.get("source") and Path(meta["source"]).is_dir():
                write_card(out, Path(meta["source"]), kind=options.format, repo=out.name)
        finally:
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    logger.info("exported %s as %s to %s: %d files, %.1f MB", source, options.format, out, len(files),
                sum(p.stat().st_size for p in files) / 1e6)
    return files
