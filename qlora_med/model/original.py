"""Import LLaVA's original checkpoint layout (``llava_mistral`` / ``llava_llama``) as an HF LLaVA folder.

The released LLaVA-Med v1.5 (``microsoft/llava-med-v1.5-mistral-7b``) and LLaVA 1.5 (``liuhaotian/llava-v1.5-7b``)
are saved by LLaVA's own code (``llava/model/language_model/llava_{mistral,llama}.py``): one config holding the LLM's
keys at top level plus ``mm_*`` keys, LLM weights named as in ``MistralForCausalLM`` (``model.layers.N.*``,
``model.embed_tokens``, ``model.norm``, ``lm_head``), the projector as ``model.mm_projector.{0,2}.*`` (``mlp2x_gelu``)
or ``model.mm_projector.*`` (``linear``), and the CLIP tower only by name (``mm_vision_tower``; a copy under
``model.vision_tower.vision_tower.vision_model.*`` is sometimes saved too). There is no ``<image>`` token: LLaVA
splices image features at id -200.

:func:`convert_original` writes the ``LlavaForConditionalGeneration`` folder stock transformers loads: the LLM and
projector tensors renamed (values untouched), the tower's weights from the folder ``resolve_tower`` gives for
``mm_vision_tower`` (or the checkpoint's copy, compared with it), ``<image>`` (and a pad token when missing) added
to the tokenizer, the embedding and ``lm_head`` rows grown for them (new rows = the mean row; ``<image>``'s is
never read, it is replaced by image features), and a processor whose image processor is the tower's.
``linear`` projectors become ``linear_1`` = the layer, ``linear_2`` = identity (exact). Every source tensor is
used or named in an error; only recomputed buffers (``rotary_emb.inv_freq``, ``position_ids``) are skipped.
Streams one input shard at a time. :func:`ensure_hf_layout` converts once into a cache.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_med.errors import QloraMedError
from qlora_med.io import atomic_dir
from qlora_med.model.processor import add_llava_tokens, image_processor_as, make_processor

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
CONVERTER_VERSION = 1  # part of the cache key: bump when the output of convert_original changes
_FAMILY_BY_ARCH = {"LlavaMistralForCausalLM": "mistral", "LlavaLlamaForCausalLM": "llama"}
_FAMILY_BY_TYPE = {"llava_mistral": "mistral", "llava_llama": "llama"}
_TEMPLATE = {"mistral": "llava_med_v15", "llama": "vicuna_v1"}  # the formats LLaVA-Med v1.5 / LLaVA 1.5 trained in
_STRATEGY = {"patch": "default", "cls_patch": "full"}
_DERIVED = re.compile(
    r"(\.rotary_emb\.inv_freq|\.embeddings\.position_ids)$"
)  # recomputed buffers, not weights
_TOWER_COPY = "model.vision_tower.vision_tower.vision_model."
_LLM_RULES = [
    ("model.layers.", "model.language_model.layers."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
    (_TOWER_COPY, "model.vision_tower."),
]
_PROJECTOR_RULES = {
    "mlp2x_gelu": [
        ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ],
    "linear": [("model.mm_projector.", "model.multi_modal_projector.linear_1.")],
}
# transformers 5 in-memory LLaVA names -> the names its save_pretrained writes
_DISK = [
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]
_RESIZED = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def is_original_layout(config: dict) -> bool:
    """True for a config.json written by LLaVA's own code (not an HF ``LlavaForConditionalGeneration`` one)."""
    if "text_config" in config or "vision_config" in config:
        return False
    archs = config.get("architectures") or []
    return (
        "mm_vision_tower" in config
        or config.get("model_type") in _FAMILY_BY_TYPE
        or any(a in _FAMILY_BY_ARCH for a in archs)
    )


@dataclass(frozen=True)
class OriginalConfig:
    """What an original config.json says, validated."""

    family: str  # mistral | llama
    vision_tower: str
    projector: str  # mlp2x_gelu | linear
    mm_hidden_size: int
    feature_layer: int
    strategy: str  # HF vision_feature_select_strategy
    image_aspect: str  # the kit's model.image_aspect: pad | crop
    text: dict  # MistralConfig / LlamaConfig keyword arguments from the top-level keys


def read_original_config(src: Path) -> OriginalConfig:
    """Parse ``src/config.json``; every unsupported value is a QloraMedError naming its key."""
    from transformers import LlamaConfig, MistralConfig

    path = Path(src) / "config.json"
    if not path.is_file():
        raise QloraMedError(f"{src}: no config.json (not a model folder)")
    raw = json.loads(path.read_text())
    if not is_original_layout(raw):
        raise QloraMedError(
            f"{path}: not LLaVA's original layout (no mm_vision_tower / llava_mistral / "
            "llava_llama); an HF LLaVA folder loads as it is"
        )
    archs = raw.get("architectures") or []
    family = _FAMILY_BY_TYPE.get(raw.get("model_type")) or next(
        (_FAMILY_BY_ARCH[a] for a in archs if a in _FAMILY_BY_ARCH), None
    )
    if family is None:
        raise QloraMedError(
            f"{path}: model_type {raw.get('model_type')!r} / architectures {archs} is not a "
            "LLaVA Mistral or Llama checkpoint (llava_mistral, llava_llama); others are not supported"
        )

    def need(key: str, allowed: tuple | None = None, default=None):
        value = raw.get(key, default)
        if value is None or (allowed is not None and value not in allowed):
            want = f"one of {list(allowed)}" if allowed else "a value"
            raise QloraMedError(f"{path}: {key} = {value!r} is not supported (need {want})")
        return value

    tower = need("mm_vision_tower", default=raw.get("vision_tower"))
    projector = need("mm_projector_type", ("mlp2x_gelu", "linear"), "linear")  # LLaVA's default is linear
    select = need("mm_vision_select_feature", tuple(_STRATEGY), "patch")
    need("mm_patch_merge_type", ("flat",), "flat")  # spatial_unpad is LLaVA-NeXT (anyres)
    aspect = need("image_aspect_ratio", ("pad", "square"), "square")
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if raw.get(key):
            raise QloraMedError(
                f"{path}: {key} = true (LLaVA v1.0-era image start/patch tokens) is not supported; "
                "HF LLaVA has a single image placeholder"
            )
    cls = MistralConfig if family == "mistral" else LlamaConfig
    keys = {p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind == p.KEYWORD_ONLY}
    keys |= {"rope_theta", "rope_scaling"}
    text = {
        k: v for k, v in raw.items() if k in keys and k not in ("use_cache", "vocab_size", "pad_token_id")
    }
    text["vocab_size"] = need("vocab_size")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        need(key)
    return OriginalConfig(
        family=family,
        vision_tower=str(tower),
        projector=projector,
        mm_hidden_size=need("mm_hidden_size"),
        feature_layer=need("mm_vision_select_layer"),
        strategy=_STRATEGY[select],
        image_aspect="pad" if aspect == "pad" else "crop",
        text=text,
    )


def weight_files(src: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight shards of an original checkpoint, in index order (pickle ``.bin`` only when allowed)."""
    src = Path(src)
    found: list[Path] = []
    for index, single, pattern in (
        ("model.safetensors.index.json", "model.safetensors", "model-*-of-*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin"),
    ):
        if (src / index).is_file():
            found = [
                src / n for n in dict.fromkeys(json.loads((src / index).read_text())["weight_map"].values())
            ]
        elif (src / single).is_file():
            found = [src / single]
        else:
            found = sorted(src.glob(pattern))
        if found:
            break
    if not found:
        only = (
            " (only mm_projector.bin: a projector from LLaVA's pretrain stage, not a full model)"
            if (src / "mm_projector.bin").is_file()
            else ""
        )
        raise QloraMedError(f"{src}: no weights (model*.safetensors or pytorch_model*.bin){only}")
    if found[0].suffix == ".bin" and not allow_pickle:
        raise QloraMedError(
            f"{src}: only pickle weights ({found[0].name}), which can run code when loaded; for a "
            "checkpoint you trust pass --allow-pickle (allow_pickle=True): they are then read with "
            "torch.load(weights_only=True)"
        )
    missing = [p.name for p in found if not p.is_file()]
    if missing:
        raise QloraMedError(f"{src}: weight shards listed in the index are missing: {', '.join(missing)}")
    return found


def _load_shard(path: Path, keys_only: bool = False) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        if keys_only:  # shapes without reading the data
            with safe_open(str(path), framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=keys_only)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for old, new in rules:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _disk(key: str) -> str:
    return _rename(key, _DISK) or key


def _grow(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t
    mean = t.float().mean(0, keepdim=True).to(t.dtype)
    return torch.cat([t, mean.expand(rows - t.shape[0], -1)])


def _tower_dir(name: str, resolve_tower: Callable[[str], Path], src: Path) -> Path:
    fix = (
        f"download that CLIP model (e.g. `hf download {name}`) and pass it, or set mm_vision_tower in "
        f"{src}/config.json to a local CLIP folder (config.json + weights + preprocessor_config.json)"
    )
    try:
        folder = Path(resolve_tower(name))
    except (QloraMedError, OSError) as err:
        raise QloraMedError(
            f"{src}/config.json: the vision tower mm_vision_tower = '{name}' (its weights are not "
            f"in the checkpoint) is not available: {err}; {fix}"
        ) from err
    if not (folder / "config.json").is_file():
        raise QloraMedError(
            f"{src}/config.json: mm_vision_tower = '{name}' resolved to {folder}, which has no "
            f"config.json (not a CLIP model folder); {fix}"
        )
    return folder


def _plan(
    layout: dict[str, torch.Size], expected: dict[str, torch.Size], projector: str, tied: bool, src: Path
) -> tuple[dict[str, str], bool]:
    """source key -> target key (``None``: skipped buffer); whether the checkpoint carries the tower."""
    rules = _PROJECTOR_RULES[projector] + _LLM_RULES
    plan, unknown, shapes = {}, [], []
    for key, shape in layout.items():
        target = _rename(key, rules)
        if target is None and _DERIVED.search(key):
            plan[key] = None
            continue
        if target is None or target not in expected:
            unknown.append(key)
            continue
        want = expected[target]
        if tuple(shape) != tuple(want) and not (
            target in _RESIZED and shape[0] <= want[0] and shape[1:] == want[1:]
        ):
            shapes.append(f"{key} {list(shape)} (expected {list(want)})")
        plan[key] = target
    if unknown:
        raise QloraMedError(
            f"{src}: {len(unknown)} tensor(s) are not part of a LLaVA {projector} checkpoint and would "
            f"be lost: {', '.join(sorted(unknown)[:20])}{' ...' if len(unknown) > 20 else ''}; "
            "check mm_projector_type and the model family in config.json"
        )
    if shapes:
        raise QloraMedError(
            f"{src}: tensor shapes do not match config.json / the vision tower: {'; '.join(shapes[:10])}"
        )
    skipped = [k for k, t in plan.items() if t is None]
    if skipped:
        logger.info("skipping %d recomputed buffer(s) such as %s (not weights)", len(skipped), skipped[0])
    has_tower = any(t.startswith("model.vision_tower.") for t in plan.values() if t)
    need = {k for k in expected if not k.startswith("model.vision_tower.") or has_tower}
    if projector == "linear":
        need -= {"model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias"}
    if tied:
        need.discard("lm_head.weight")
    back = [(new, old) for old, new in rules]
    missing = sorted(_rename(k, back) or k for k in need - set(plan.values()))  # named as in the checkpoint
    if missing:
        what = (
            "the checkpoint's vision tower copy is incomplete: "
            if all(m.startswith(_TOWER_COPY) for m in missing)
            else ""
        )
        raise QloraMedError(
            f"{src}: {what}missing tensors {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}"
        )
    return plan, has_tower


def _write_part(out: Path, index: int, tensors: dict[str, torch.Tensor]) -> tuple[list[str], int]:
    """Write one shard under a temporary name (renamed by :func:`_finish_shards`); return its keys and bytes."""
    from safetensors.torch import save_file

    if tensors:
        save_file(tensors, str(out / f".part-{index:05d}.safetensors"), metadata={"format": "pt"})
    return list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


def _finish_shards(out: Path, parts: list[tuple[list[str], int]]) -> None:
    """Name the parts ``model[-XXXXX-of-YYYYY].safetensors`` and write the index when sharded."""
    import os

    written = [(i, keys) for i, (keys, _) in enumerate(parts) if keys]
    n = len(written)
    names = (
        ["model.safetensors"] if n == 1 else [f"model-{j + 1:05d}-of-{n:05d}.safetensors" for j in range(n)]
    )
    weight_map, total = {}, sum(nbytes for _, nbytes in parts)
    for (i, keys), name in zip(written, names, strict=True):
        os.replace(out / f".part-{i:05d}.safetensors", out / name)
        os.chmod(out / name, 0o644)  # safetensors writes private (0600) files
        weight_map.update(dict.fromkeys(keys, name))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def convert_original(
    src: Path,
    out: Path,
    resolve_tower: Callable[[str], Path],
    *,
    allow_pickle: bool = False,
    image_token: str = IMAGE_TOKEN,
    overwrite: bool = True,
) -> Path:
    """Write the original-layout checkpoint ``src`` as an HF ``LlavaForConditionalGeneration`` folder ``out``.

    ``resolve_tower(mm_vision_tower)`` returns the local CLIP folder (config, weights, image processor).
    Atomic: ``out`` appears complete or not at all. ``overwrite=False`` refuses a non-empty ``out``.
    """
    from transformers import (
        AutoTokenizer,
        CLIPVisionModel,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
        PreTrainedConfig,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    src, out = Path(src), Path(out)
    if not overwrite and out.exists() and any(out.iterdir()):
        raise QloraMedError(f"{out} exists and is not empty; pass --overwrite to replace it")
    spec = read_original_config(src)
    shards = weight_files(src, allow_pickle)
    tower_dir = _tower_dir(spec.vision_tower, resolve_tower, src)
    try:
        tower, loading = CLIPVisionModel.from_pretrained(tower_dir, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise QloraMedError(
            f"{src}/config.json: mm_vision_tower '{spec.vision_tower}' -> {tower_dir} does not load as "
            f"a CLIP vision model ({err}); point mm_vision_tower at a CLIP folder"
        ) from err
    vision = tower.config
    vision.architectures, vision.dtype = None, None  # a sub-config of the LLaVA (its dtype is the LLaVA's)
    if vision.hidden_size != spec.mm_hidden_size:
        raise QloraMedError(
            f"{src}/config.json: mm_hidden_size {spec.mm_hidden_size} != hidden size "
            f"{vision.hidden_size} of the tower {tower_dir}: mm_vision_tower names the wrong CLIP"
        )
    tower_state = {
        "model.vision_tower." + k.removeprefix("vision_model."): v for k, v in tower.state_dict().items()
    }
    text_cls = MistralConfig if spec.family == "mistral" else LlamaConfig
    try:  # config=: transformers cannot read a llava_* config.json (it warns, then picks tokenizer_config's class)
        tokenizer = AutoTokenizer.from_pretrained(src, config=PreTrainedConfig())
    except (OSError, ValueError) as err:
        raise QloraMedError(
            f"{src}: the tokenizer does not load ({err}); the folder needs tokenizer.model / "
            "tokenizer_config.json as LLaVA saves them"
        ) from err
    before = len(tokenizer)
    add_llava_tokens(tokenizer, image_token)
    layout = {k: v.shape for shard in shards for k, v in _load_shard(shard, keys_only=True).items()}
    if "model.embed_tokens.weight" not in layout:
        raise QloraMedError(f"{src}: no model.embed_tokens.weight: not LLaVA's original weight names")
    old_vocab = layout["model.embed_tokens.weight"][0]
    vocab = old_vocab if len(tokenizer) <= old_vocab else (len(tokenizer) + 63) // 64 * 64
    text = text_cls(**{**spec.text, "vocab_size": vocab}, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        projector_hidden_act="gelu" if spec.projector == "mlp2x_gelu" else "linear",
        vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy=spec.strategy,
        image_token_index=tokenizer.convert_tokens_to_ids(image_token),
        image_seq_length=(vision.image_size // vision.patch_size) ** 2 + (spec.strategy == "full"),
        tie_word_embeddings=text.tie_word_embeddings,
    )
    with torch.device("meta"):
        expected = {k: v.shape for k, v in LlavaForConditionalGeneration(config).state_dict().items()}
    plan, has_tower = _plan(layout, expected, spec.projector, text.tie_word_embeddings, src)
    absent = sorted(loading["missing_keys"]) + [str(m[0]) for m in loading["mismatched_keys"]]
    if absent and not has_tower:  # from_pretrained would have initialised them at random
        raise QloraMedError(
            f"{src}/config.json: the vision tower mm_vision_tower = '{spec.vision_tower}' ({tower_dir}) lacks "
            f"weights {', '.join(absent[:10])}: point mm_vision_tower at a complete CLIP folder"
        )
    logger.info(
        "importing %s (LLaVA %s, %s projector, tower %s%s)",
        src,
        spec.family,
        spec.projector,
        spec.vision_tower,
        ", the checkpoint's copy" if has_tower else "",
    )
    if vocab > old_vocab:
        logger.info(
            "added %d token(s) (%s); embeddings and lm_head grown %d -> %d rows, new rows = the mean row",
            len(tokenizer) - before,
            image_token,
            old_vocab,
            vocab,
        )
    with atomic_dir(out) as tmp:
        parts, dtype, differ = [], None, []
        for shard in shards:
            part = {}
            for key, tensor in _load_shard(shard).items():
                target = plan[key]
                if target is None:
                    continue
                if target.startswith("model.vision_tower.") and not torch.equal(
                    tensor, tower_state[target].to(tensor.dtype)
                ):
                    differ.append(key)
                if target in _RESIZED:
                    tensor = _grow(tensor, vocab)
                    dtype = tensor.dtype if target == _RESIZED[0] else dtype
                part[_disk(target)] = (
                    tensor.contiguous().clone() if shard.suffix == ".bin" else tensor.contiguous()
                )
                if spec.projector == "linear" and target.startswith("model.multi_modal_projector.linear_1."):
                    name = target.replace("linear_1", "linear_2")  # identity: the map stays one linear layer
                    size = text.hidden_size
                    part[_disk(name)] = (
                        torch.eye(size, dtype=tensor.dtype)
                        if name.endswith("weight")
                        else torch.zeros(size, dtype=tensor.dtype)
                    )
            parts.append(_write_part(tmp, len(parts), part))
            del part
        if not has_tower:
            tower_part = {_disk(k): v.to(dtype).contiguous() for k, v in tower_state.items()}
            parts.append(_write_part(tmp, len(parts), tower_part))
        elif differ:
            logger.warning(
                "%s: %d vision tower tensor(s) in the checkpoint differ from %s (e.g. %s): using the "
                "checkpoint's copy (a tower trained with the LLM)",
                src,
                len(differ),
                tower_dir,
                differ[0],
            )
        _finish_shards(tmp, parts)
        config.dtype = dtype
        config.save_pretrained(tmp)
        try:
            image_processor = CLIPImageProcessorPil.from_pretrained(tower_dir)
        except OSError:
            logger.warning(
                "%s has no preprocessor_config.json; using CLIP's default image processor", tower_dir
            )
            size = vision.image_size
            image_processor = CLIPImageProcessorPil(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            )
        processor = make_processor(
            tokenizer, vision.image_size, vision.patch_size, image_token, image_processor
        )
        processor.vision_feature_select_strategy = spec.strategy
        if spec.image_aspect == "pad":  # plain AutoProcessor then pads to a square as LLaVA's expand2square did
            processor.image_processor = image_processor_as(processor.image_processor, "Llava", do_pad=True)
        processor.save_pretrained(tmp)
        if (src / "generation_config.json").is_file():
            shutil.copy(src / "generation_config.json", tmp / "generation_config.json")
        meta = {
            "template": _TEMPLATE[spec.family],
            "image_aspect": spec.image_aspect,
            "image_token": image_token,
            "imported_from": str(src.resolve()),
            "vision_tower": spec.vision_tower,
        }
        (tmp / "qlora_med.json").write_text(json.dumps(meta, indent=1) + "\n")
    logger.info("wrote HF LLaVA folder %s", out)
    return out


def hub_tower_resolver(allow_pickle: bool = False) -> Callable[[str], Path]:
    """``resolve_tower`` for :func:`convert_original`: a local folder as is, a Hub id from the HF cache/Hub."""
    from qlora_med.model.source import resolve_model

    def resolve(name: str) -> Path:
        return resolve_model(name, key="mm_vision_tower", allow_pickle=allow_pickle)

    return resolve


def _cache_key(folder: Path) -> str:
    """Hash of the folder's path, its config.json and its weights index (or its weight files' names and sizes)."""
    parts: list = [CONVERTER_VERSION, str(folder.resolve()), (folder / "config.json").read_text()]
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / name).is_file():
            parts.append((folder / name).read_text())
    parts += sorted(
        (p.name, p.stat().st_size) for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern)
    )
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def ensure_hf_layout(
    folder: Path, cache_dir: Path, resolve_tower: Callable[[str], Path], *, allow_pickle: bool = False
) -> Path:
    """``folder`` itself when it is not in LLaVA's original layout, else its HF conversion under
    ``cache_dir/imported/<hash>`` (converted on the first call; later calls are cache hits).

    Not safe for several processes converting the same folder at once: convert on one (the main) process first.
    """
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file() or not is_original_layout(json.loads(config.read_text())):
        return folder
    out = Path(cache_dir) / "imported" / _cache_key(folder)
    if (out / "config.json").is_file():
        logger.info("%s: original LLaVA layout, using its HF conversion %s", folder, out)
        return out
    logger.info("%s is in LLaVA's original layout: converting it once to %s", folder, out)
    return convert_original(folder, out, resolve_tower, allow_pickle=allow_pickle)


def import_checkpoint(source: str, out: Path, *, allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """``qlora-med import``: resolve ``source`` (a folder or a Hub id) and its tower, convert into ``out``."""
    from qlora_med.model.source import resolve_model

    try:
        src = resolve_model(source, key="SRC", allow_pickle=allow_pickle)
    except QloraMedError as err:
        if "allow_pickle" not in str(err):
            raise
        raise QloraMedError(f"{err} (for `qlora-med import`: --allow-pickle)") from err
    return convert_original(
        src, Path(out), hub_tower_resolver(allow_pickle), allow_pickle=allow_pickle, overwrite=overwrite
    )
