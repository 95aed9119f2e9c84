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

from qlora_med.artifacts.run_dir import saved_recipe, stage_chain
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


def _usage(kind: str, repo: str, image_aspect: str, template: str) -> str:
    pad = ("Images were padded to a square with the image processor's mean colour before preprocessing in "
           "training (`image_aspect: pad`); do the same for non-square images." if image_aspect == "pad" else
           "Images were resized and centre-cropped by the image processor in training.")
    if kind == "peft":
        code = f"""from peft import PeftModel
from safetensors.torch import load_file
from huggingface_hub import hf_hub_download
from transformers import AutoProcessor, LlavaForConditionalGeneration

base = LlavaForConditionalGeneration.from_pretrained("BASE_MODEL")   # the base named in adapter_config.json
model = PeftModel.from_pretrained(base, "{repo}")                     # LoRA adapters of the LLM
projector = load_file(hf_hub_download("{repo}", "projector.safetensors"))
model.base_model.model.model.multi_modal_projector.load_state_dict(projector)  # the trained projector
processor = AutoProcessor.from_pretrained("{repo}")"""
    elif kind == "gguf":
        return ("```sh\nllama-mtmd-cli -m llm-*.gguf --mmproj mmproj-*.gguf --image scan.png "
                "-p \"What does this image show?\"\n```\n" + pad)
    elif kind == "llava-med":
        return ("Load with the original LLaVA-Med code base: `llava.model.builder.load_pretrained_model(path, None, "
                "'llava-med-...-mistral')` (the model name must contain `llava` and `mistral`), conversation mode "
                f"`{template}`. `mm_vision_tower` names the CLIP tower LLaVA-Med loads.\n" + pad)
    else:
        code = f"""from transformers import AutoProcessor, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained("{repo}")
processor = AutoProcessor.from_pretrained("{repo}")"""
    return f"""```python
{code}

messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What does this image show?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)   # the training template
inputs = processor(images=image, text=prompt, add_special_tokens=False, return_tensors="pt")
print(processor.decode(model.generate(**inputs, max_new_tokens=128)[0], skip_special_tokens=True))
```
{pad}"""


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
    lines = [f"---\n{data.to_yaml()}\n---", "", f"# {repo.split('/')[-1]}", "",
             f"A LLaVA-style biomedical vision-language assistant fine-tuned with qlora-med: the CLIP vision "
             f"tower frozen, the projector fully trained, the LLM trained with QLoRA (NF4 base + LoRA "
             f"adapters). Format: **{kind}**.", "", "## Intended use and limitations", "", NOTICE, ""]
    lines += ["## Base models", ""]
    lines += [f"- `{m}`" for m in base_models] or [f"- `{last.get('base_model')}` (local path at training time)"]
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
    lines += ["## How to use", "", _usage(kind, repo, last.get("image_aspect", "pad"), str(last.get("template"))), ""]
    if recipe:
        lines += ["## Resolved recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_card(out: Path, src: Path, kind: str, options: CardOptions | None = None, repo: str | None = None) -> Path:
    """Write ``out/README.md`` for a model built from ``src``."""
    card = build_card(src, kind, out, options, repo or out.name)
    atomic_write_text(out / CARD_FILE, card)
    os.chmod(out / CARD_FILE, 0o644)  # atomic_write_text's temp file is private; a card is public
    return out / CARD_FILE
