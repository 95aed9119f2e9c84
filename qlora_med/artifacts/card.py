"""Model cards: the README.md (Hub YAML metadata + Markdown) of a merged, exported or pushed model.

The card is built from what the run saved: every stage's ``stage.json`` (losses, steps, wall time,
hardware), the resolved recipe (all stages and hyper-parameters) and, when present, evaluation
score files (``eval/*.json`` next to the model, or files given with ``--eval-json``). The research-only
notice and the Hub tags come from :mod:`qlora_med.notices`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qlora_med.artifacts.run_dir import META_FILE, saved_recipe, stage_chain
from qlora_med.errors import QloraMedError
from qlora_med.io import atomic_write_text
from qlora_med.notices import NOTICE, TAGS

CARD_FILE = "README.md"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # USER/NAME or ORG/NAME
_LIBRARY = {"merged": "transformers", "llava-med": "transformers", "peft": "peft", "gguf": "gguf"}
# `license: other` needs a name and a link on the Hub. LLaVA-Med's data and weights are under the Microsoft
# Research License Terms (non-commercial research only; they restrict redistribution of the models).
RESEARCH_LICENSE_NAME = "microsoft-research-license"
RESEARCH_LICENSE_LINK = "https://github.com/microsoft/LLaVA-Med/blob/main/LICENSE"


@dataclass
class CardOptions:
    """Metadata the run cannot know: Hub ids of the base models and datasets, the license."""

    base_models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    license: str = "other"
    license_name: str | None = None  # with license "other": default RESEARCH_LICENSE_NAME
    license_link: str | None = None  # with license "other": default RESEARCH_LICENSE_LINK
    eval_files: list[Path] = field(default_factory=list)

    def license_metadata(self) -> dict[str, str]:
        """The Hub's license keys: ``license``, plus ``license_name``/``license_link`` for ``other``."""
        if self.license != "other":
            return {"license": self.license}
        return {"license": "other", "license_name": self.license_name or RESEARCH_LICENSE_NAME,
                "license_link": self.license_link or RESEARCH_LICENSE_LINK}


def _hub_ids(recipe: dict) -> list[str]:
    """Base model ids from the recipe that look like Hub ids (not local paths)."""
    model = recipe.get("model") or {}
    values = [model.get(k) for k in ("name_or_path", "vision_tower", "llm")]
    return [v for v in values if isinstance(v, str) and HUB_ID.match(v) and not Path(v).exists()]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _eval_rows(path: Path) -> list[tuple[str, str, str]]:
    """(benchmark, metric, value) rows from an ``eval score --json`` / ``eval chat --json`` file or a flat JSON."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise QloraMedError(f"{path}: unreadable evaluation file ({err})") from err
    name = Path(str(data.get("data", path.stem))).stem if isinstance(data, dict) else path.stem
    rows = []
    if isinstance(data, dict) and isinstance(data.get("overall"), dict):
        for block in ("paper", "strict"):
            for metric, value in (data["overall"].get(block) or {}).items():
                rows.append((name, f"{metric} ({block})", _fmt(value)))
    elif isinstance(data, dict) and isinstance(data.get("groups"), dict):
        for group, scores in data["groups"].items():
            rows.append((name, f"relative score: {group}", _fmt(scores.get("relative"))))
    elif isinstance(data, dict):
        rows = [(name, k, _fmt(v)) for k, v in data.items() if isinstance(v, (int, float))]
    return rows


def _usage(kind: str, repo: str, image_aspect: str, template: str, model_dir: Path | None = None,
           stage: dict | None = None, recipe: dict | None = None) -> str:
    pad = ("Images were padded to a square with the image processor's mean colour before preprocessing in "
           "training (`image_aspect: pad`); do the same for non-square images." if image_aspect == "pad" else
           "Images were resized and centre-cropped by the image processor in training.")
    if kind in ("peft", "merged"):
        return _python_usage(kind, repo, image_aspect, model_dir, stage or {}, recipe or {})
    elif kind == "gguf":
        return ("```sh\nllama-mtmd-cli -m llm-*.gguf --mmproj mmproj-*.gguf --jinja --image scan.png "
                "-p \"What does this image show?\"\n```\n`--jinja` applies the training chat template stored in the "
                "GGUF (without it llama.cpp guesses a built-in one). llama.cpp's LLaVA image graph puts CLIP's class token "
                "after the patches (ggml-org/llama.cpp#25814, open as of llama.cpp in llama-cpp-python 0.3.36), so its "
                "image features differ somewhat from transformers'; text-only prompts are unaffected. " + pad)
    elif kind == "llava-med":
        return ("Load with the original LLaVA-Med code base: `llava.model.builder.load_pretrained_model(path, None, "
                "'llava-med-...-mistral')` (the model name must contain `llava` and `mistral`), conversation mode "
                f"`{template}`. `mm_vision_tower` names the CLIP tower LLaVA-Med loads.\n" + pad)
    return _python_usage("merged", repo, image_aspect, model_dir, stage or {}, recipe or {})


def _processor_pads(model_dir: Path | None) -> bool:
    """Whether the folder's saved image processor pads to a square itself (``do_pad``, see merge.padding_processor)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = model_dir / name if model_dir is not None else None
        if path is not None and path.is_file():
            config = json.loads(path.read_text())
            if config.get("image_processor", config).get("do_pad"):
                return True
    return False


def _peft_base(model_dir: Path | None, stage: dict) -> str | None:
    """The base an adapter loads on: adapter_config.json's ``base_model_name_or_path``, else stage.json's."""
    adapter_config = model_dir / "adapter_config.json" if model_dir is not None else None
    return (json.loads(adapter_config.read_text()).get("base_model_name_or_path")
            if adapter_config is not None and adapter_config.is_file() else None) or stage.get("base_model")


def _family(model_dir: Path | None, stage: dict):
    """The model's family (:mod:`qlora_med.config.families`): the folder's config.json (merged), else the local
    base's, else ``qlora_med.json``'s ``family``; LLaVA 1.5 when none says."""
    from qlora_med.config.families import BY_MODEL_TYPE, FAMILIES

    for folder in (model_dir, _peft_base(model_dir, stage), stage.get("base_model")):
        config_file = Path(folder) / "config.json" if folder else None
        if config_file is not None and config_file.is_file():
            model_type = json.loads(config_file.read_text()).get("model_type")
            if model_type in BY_MODEL_TYPE:  # a LLaVA-Med export's config says llava_mistral: its base decides
                return BY_MODEL_TYPE[model_type]
    meta_file = model_dir / META_FILE if model_dir is not None else None
    name = json.loads(meta_file.read_text()).get("family") if meta_file is not None and meta_file.is_file() else None
    return FAMILIES.get(name or "llava", FAMILIES["llava"])


def _peft_setup(repo: str, model_dir: Path | None, stage: dict, recipe: dict) -> str:
    """Loading code that rebuilds the trained model: the base quantized exactly as in training (the family's class),
    the adapter, the fp32 connector by full module path (see qlora_med.model.load.load_model and
    quantization_config)."""
    base = _peft_base(model_dir, stage)
    dtype = stage.get("compute_dtype") or "float32"
    double_quant = bool((recipe.get("model") or {}).get("double_quant", True))
    family = _family(model_dir, stage)
    skip = json.dumps(family.quant_skip)
    connector = json.dumps(list(family.connector))
    quantization = {
        "nf4": f"""quantization = BitsAndBytesConfig(  # exactly training's: LLM linears in NF4, the rest full precision
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant={double_quant},
    bnb_4bit_compute_dtype=dtype,
    llm_int8_skip_modules={skip},  # full module paths
)""",
        "int8": f"""quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules={skip})  # as in training""",
    }.get(str(stage.get("quantization")), "quantization = None  # trained on the unquantized base")
    return f"""import os

import torch
from huggingface_hub import hf_hub_download
from peft import PeftModel
from PIL import Image, ImageOps
from safetensors.torch import load_file
from transformers import AutoProcessor, BitsAndBytesConfig, {family.hf_class}

adapter = "{repo}"  # this folder, or its Hub repo id
base = "{base}"  # the base the adapter was trained on (adapter_config.json)
dtype = torch.{dtype}  # the compute dtype of training
{quantization}
model = {family.hf_class}.from_pretrained(base, quantization_config=quantization, dtype=dtype,
{" " * len(f"model = {family.hf_class}.from_pretrained(")}device_map="auto")
model = PeftModel.from_pretrained(model, adapter).eval()  # LoRA adapters of the LLM
projector_file = (os.path.join(adapter, "projector.safetensors") if os.path.isdir(adapter)
                  else hf_hub_download(adapter, "projector.safetensors"))
inner = model.base_model.model  # the transformers model under PEFT
state = load_file(projector_file)  # the connector, trained in fp32, by full module path
for name, tensor in state.items():
    inner.get_parameter(name).data = tensor.float()
modules = dict(inner.named_modules())
for path in {connector}:  # the connector's modules run in fp32, fed and read in the compute dtype
    if path in modules:  # (a connector parameter such as LLaVA-NeXT's image_newline is no module)
        modules[path].register_forward_pre_hook(lambda module, args: (args[0].float(), *args[1:]))
        modules[path].register_forward_hook(lambda module, args, out: out.to(dtype) if torch.is_tensor(out) else out)
if model.device.type == "cpu":  # bitsandbytes' AVX-512 BF16 inference repacking changes logits: the training forward
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
processor = AutoProcessor.from_pretrained(adapter)"""


def _bnb_cpu_affected(base: str | None) -> bool:
    """Whether a local base has LLM linears whose input width is not a multiple of NF4's block (64): bitsandbytes'
    AVX-512 CPU dequantize gets those wrong (qlora_med.patches.bnb_cpu corrects it in the kit, not elsewhere)."""
    config_file = Path(base) / "config.json" if base else None
    if config_file is None or not config_file.is_file():
        return False
    text = json.loads(config_file.read_text()).get("text_config") or {}
    hidden, heads = int(text.get("hidden_size") or 0), int(text.get("num_attention_heads") or 1)
    widths = {hidden, heads * int(text.get("head_dim") or hidden // heads), int(text.get("intermediate_size") or 0)}
    return any(w % 64 for w in widths if w)


def _image_side(model_dir: Path | None, stage: dict) -> int | None:
    """The square side training resized images to (any-res / dynamic families): ``qlora_med.json``'s ``image_size``
    (merge and export record the recipe's, else the family default), else stage.json's."""
    meta_file = model_dir / META_FILE if model_dir is not None else None
    meta = json.loads(meta_file.read_text()) if meta_file is not None and meta_file.is_file() else {}
    return meta.get("image_size") or stage.get("image_size")


def _image_mean(model_dir: Path | None) -> list[float] | None:
    """The saved image processor's normalisation mean (the colour training padded with)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = model_dir / name if model_dir is not None else None
        if path is not None and path.is_file():
            config = json.loads(path.read_text())
            mean = config.get("image_processor", config).get("image_mean")
            if mean:
                return mean
    return None


def _square_code(family, image_aspect: str, model_dir: Path | None, stage: dict) -> tuple[str, str]:
    """Code that makes an image what a non-LLaVA-1.5 family trained on (its processor is kept as saved), and the
    sentence that says so: padded to a square with the processor's mean colour (or centre-cropped with
    ``image_aspect: crop``), then, for any-res / dynamic families, resized to the recorded ``image_size``."""
    from qlora_med.data.images import pad_colour

    side = _image_side(model_dir, stage) if family.image_tokens != "fixed" else None
    if image_aspect == "pad":
        colour = pad_colour(_image_mean(model_dir) or (0.5, 0.5, 0.5))
        code = f"""square = Image.new("RGB", (max(image.size),) * 2, {colour})  # as training: padded to a square
square.paste(image, ((square.width - image.width) // 2, (square.height - image.height) // 2))"""
        text = (f"Training padded every image to a square with the image processor's mean colour {colour} "
                "(`image_aspect: pad`)")
    else:
        code = """crop = min(image.size)  # as training: the centred square
left, top = (image.width - crop) // 2, (image.height - crop) // 2
square = image.crop((left, top, left + crop, top + crop))"""
        text = "Training centre-cropped every image to a square (`image_aspect: crop`)"
    if side:
        code += f"""
image = square.resize(({side}, {side}), Image.Resampling.BICUBIC)  # model.image_size: training's tokens per image"""
        text += f" and resized it to {side}x{side} px (bicubic, `model.image_size`), so each image gives the same tokens"
    else:
        code += "\nimage = square"
    text += " before the model's own image processor (saved as it was); the code above does the same."
    return code, text


def _python_usage(kind: str, repo: str, image_aspect: str, model_dir: Path | None, stage: dict, recipe: dict) -> str:
    """Plain transformers (+ PEFT) code, tested to reproduce the kit's prompts, pixels and logits."""
    family = _family(model_dir, stage)
    prepare = ""
    if family.name != "llava":
        prepare, pad = _square_code(family, image_aspect, model_dir, stage)
        prepare = "\n" + prepare
    elif image_aspect != "pad":
        pad = "Images were resized and centre-cropped by the image processor in training, as it does here."
    elif _processor_pads(model_dir):
        pad = ("The saved image processor pads non-square images to a square with the mean colour itself "
               "(`LlavaImageProcessor(do_pad=True)`, LLaVA's `expand2square`), as training did (`image_aspect: pad`), "
               "so this code sees the training pixels.")
    else:
        pad = ("Images were padded to a square with the image processor's mean colour before preprocessing in "
               "training (`image_aspect: pad`); do the same for non-square images.")
    if kind == "peft":
        setup = _peft_setup(repo, model_dir, stage, recipe)
        pad += (" On CPU this code reproduces the kit's own loaded model (`load_trained`) bit for bit (tested); the "
                "CPU block keeps bitsandbytes' training forward.")
        if str(stage.get("quantization")) == "nf4" and _bnb_cpu_affected(stage.get("base_model")):
            pad += (" This base has LLM linear layers whose input width is not a multiple of 64: on AVX-512 CPUs "
                    "bitsandbytes 0.49-0.50 dequantizes them with other blocks' scales (the kit corrects this, plain "
                    "bitsandbytes does not), so there the logits differ from training's; a GPU computes them right.")
    else:
        setup = f"""from PIL import Image, ImageOps
from transformers import AutoProcessor, {family.hf_class}

model = {family.hf_class}.from_pretrained("{repo}", device_map="auto").eval()
processor = AutoProcessor.from_pretrained("{repo}")
dtype = model.dtype"""
    return f"""```python
{setup}

image = ImageOps.exif_transpose(Image.open("scan.png")).convert("RGB"){prepare}
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What does this image show?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)  # the training template
inputs = processor(images=image, text=prompt, add_special_tokens=False, return_tensors="pt").to(model.device, dtype=dtype)
output = model.generate(**inputs, max_new_tokens=128, do_sample=False)  # greedy
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
{pad}"""


_MERGES = {
    "original": "Weights: the LoRA adapters merged onto the **original full-precision base** (`merge: original`). "
                "Training and evaluation saw the NF4-quantized base, so this model differs from the evaluated one by "
                "the base's NF4 rounding error; `--nf4-faithful` (merge / export) merges onto the NF4-round-tripped "
                "base instead.",
    "nf4-faithful": "Weights: the LoRA adapters merged onto the **NF4-round-tripped base** (`merge: nf4-faithful`: "
                    "every NF4-quantized LLM linear is dequant(quant_nf4(W)), the weights the adapters were trained "
                    "and evaluated with), so this model reproduces the evaluated adapter model up to float rounding.",
}


def _merge_line(model_dir: Path | None) -> str | None:
    """Which base the adapters were merged onto, from the model folder's qlora_med.json (None: not merged)."""
    meta_file = model_dir / META_FILE if model_dir is not None else None
    if meta_file is None or not meta_file.is_file():
        return None
    mode = json.loads(meta_file.read_text()).get("merge")
    return _MERGES.get(mode, f"Weights: merged with `merge: {mode}`.") if mode else None


def build_card(src: Path, kind: str, model_dir: Path | None = None, options: CardOptions | None = None,
               repo: str = "PATH_OR_REPO") -> str:
    """The README.md text for a model built from the stage output ``src``."""
    from huggingface_hub import ModelCardData

    options = options or CardOptions()
    chain = stage_chain(src)
    last = chain[-1]
    recipe = saved_recipe(src)
    base_models = options.base_models or _hub_ids(recipe)
    data = ModelCardData(
        library_name=_LIBRARY.get(kind, "transformers"), **options.license_metadata(),
        base_model=base_models or None, datasets=options.datasets or None, tags=TAGS,
        pipeline_tag="image-text-to-text",
    )
    family = _family(model_dir, last)
    lines = [f"---\n{data.to_yaml()}\n---", "", f"# {repo.split('/')[-1]}", "",
             f"A biomedical vision-language assistant ({family.title}) fine-tuned with qlora-med: the vision "
             f"tower frozen, the projector (`{'`, `'.join(family.connector)}`) fully trained, the LLM trained with "
             f"QLoRA (NF4 base + LoRA adapters). Format: **{kind}**.", "", "## Intended use and limitations", "",
             NOTICE, ""]
    lines += ["## Base models", ""]
    lines += [f"- `{m}`" for m in base_models] or [f"- `{last.get('base_model')}` (local path at training time)"]
    merge_line = _merge_line(model_dir)
    if merge_line:
        lines += ["", merge_line]
    lines += ["", "## Training", "", "| stage | kind | template | trains | data | steps | samples | loss first -> last "
              "| wall time | hardware |", "|---|---|---|---|---|---|---|---|---|---|"]
    stages = {s.get("name"): s for s in recipe.get("stages") or []}
    for info in chain:
        stage = stages.get(info.get("stage"), {})
        sources = stage.get("data") if isinstance(stage.get("data"), list) else [stage.get("data") or {}]
        data_names = ", ".join(f"`{Path(str(s.get('path'))).name}`" for s in sources if s.get("path")) or "-"
        train = info.get("train") or {}
        trains = ", ".join(f"{k}: {v}" for k, v in train.items()) or "-"
        lines.append(f"| {info.get('stage')} | {info.get('kind')} | {info.get('template')} | {trains} | {data_names} "
                     f"| {_fmt(info.get('steps'))} | {_fmt(info.get('samples'))} | {_fmt(info.get('loss_first'))} -> "
                     f"{_fmt(info.get('loss_last'))} | {_fmt(info.get('wall_time_s'))} s | {info.get('hardware', '-')} |")
    total = sum(float(s.get("wall_time_s") or 0) for s in chain)
    lora = last.get("lora") or {}
    lines += ["", f"Total wall time: {total / 60:.1f} min. Quantization: {last.get('quantization')} "
              f"(compute {last.get('compute_dtype')}). LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, "
              f"dropout={lora.get('dropout')}, targets={lora.get('target_modules')}.", ""]
    hp_keys = ("learning_rate", "projector_lr", "num_epochs", "max_steps", "per_device_batch_size",
               "gradient_accumulation_steps", "max_length", "lr_scheduler", "warmup_ratio", "weight_decay", "optim")
    if stages:
        lines += ["### Hyper-parameters", "", "| stage | " + " | ".join(hp_keys) + " |",
                  "|---" * (len(hp_keys) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(_fmt(s.get(k)) for k in hp_keys) + " |" for n, s in stages.items()]
        lines.append("")
    eval_files = list(options.eval_files)
    for folder in filter(None, (model_dir, src)):
        eval_files += sorted((folder / "eval").glob("*.json")) if (folder / "eval").is_dir() else []
    rows = [row for f in dict.fromkeys(eval_files) for row in _eval_rows(Path(f))]
    if rows:
        lines += ["## Evaluation", "", "| benchmark | metric | value |", "|---|---|---|"]
        lines += [f"| {b} | {m} | {v} |" for b, m, v in rows] + [""]
    lines += ["## How to use", "", _usage(kind, repo, last.get("image_aspect", "pad"), str(last.get("template")),
                                        model_dir, last, recipe), ""]
    if recipe:
        lines += ["## Resolved recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_card(out: Path, src: Path, kind: str, options: CardOptions | None = None, repo: str | None = None) -> Path:
    """Write ``out/README.md`` for a model built from ``src``."""
    card = build_card(src, kind, out, options, repo or out.name)
    atomic_write_text(out / CARD_FILE, card)
    os.chmod(out / CARD_FILE, 0o644)  # atomic_write_text's temp file is private; a card is public
    return out / CARD_FILE
