"""What training sees for the first records of a data file: ``qlora-med data preview``.

Each record is rendered with the recipe stage's template and encoded exactly as the training build encodes it
(:func:`qlora_med.prompts.templates.render` + :func:`~qlora_med.prompts.templates.encode_batch`, the stage's
``max_length``, the model's tokenizer, image token and count, and chat format for ``chat_template``: those of
:func:`qlora_med.data.model_text.load_model_text`). The text report shows the rendered prompt, then the tokens
with the trained ones highlighted (ANSI colour, or ``[brackets]`` when not writing to a terminal) and runs of
image tokens collapsed to ``<image>xN`` (the family's image token), and the counts of trained, masked and
truncated tokens; the JSON report gives each record's ``input_ids`` and ``labels`` (image positions as the image
token id), the template and the tokenizer mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from qlora_med.config.families import CHAT_TEMPLATE
from qlora_med.config.schema import ModelConfig, RecipeConfig, StageConfig
from qlora_med.data.model_text import ModelText, load_model_text
from qlora_med.data.records import BadRecord, InvalidJSON, iter_json_objects, parse_record
from qlora_med.errors import ConfigError
from qlora_med.prompts.chat_render import ChatFormat
from qlora_med.prompts.templates import IGNORE_INDEX, TEMPLATE_SPECS, encode_batch, render, tokenizer_mode
from qlora_med.prompts.tokenization import describe

TRAINED_COLOUR, RESET = "\033[1;32m", "\033[0m"


@dataclass
class PreviewRecord:
    """One record as training sees it: ids and labels within ``max_length``; ``problem`` when unusable."""

    id: str
    text: str = ""
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    num_tokens: int = 0  # before truncation, image tokens included
    problem: str | None = None

    @property
    def trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    @property
    def masked(self) -> int:
        return len(self.labels) - self.trained

    @property
    def truncated(self) -> int:
        return self.num_tokens - len(self.input_ids)


@dataclass
class Preview:
    """The previewed records and how they were encoded."""

    template: str
    tokenizer_mode: dict[str, Any]
    max_length: int
    num_image_tokens: int
    image_token_id: int
    records: list[PreviewRecord]


def stage_of(recipe: RecipeConfig, name: str | None) -> StageConfig:
    """The recipe's stage called ``name`` (default: its first stage)."""
    if name is None:
        return recipe.stages[0]
    for stage in recipe.stages:
        if stage.name == name:
            return stage
    raise ConfigError(
        f"no stage '{name}' in the recipe; its stages: {', '.join(s.name for s in recipe.stages)}"
    )


def recipe_model_text(cfg: ModelConfig, template: str | None = None) -> ModelText:
    """What training encodes with for this model: its tokenizer (with the image token), tokens per image, image
    token and, for template ``chat_template``, its chat format (:func:`~qlora_med.data.model_text.load_model_text`).

    A tiny model is built first if missing (seconds); compose mode reads the LLM's tokenizer and the vision
    tower's config (no chat format: a ConfigError for ``chat_template``); otherwise the model's tokenizer and
    configs are read (a Hub model: those files only).
    """
    if cfg.vision_tower is not None:
        from transformers import AutoConfig

        from qlora_med.model.source import resolve_model

        if template == CHAT_TEMPLATE:
            raise ConfigError(
                "data preview: template chat_template needs the model's processor chat template, and compose mode "
                "(model.vision_tower + model.llm) is previewed from the LLM's tokenizer and the tower's config only; "
                "preview the composed model's folder (model.name_or_path) once training has composed it, or set "
                "the stage's template to one of the kit's (e.g. llava_med_v15)"
            )
        text = load_model_text(cfg.llm, cfg.image_token)
        tower = AutoConfig.from_pretrained(
            resolve_model(cfg.vision_tower, key="model.vision_tower", weights=False)
        )
        tower = getattr(tower, "vision_config", tower)
        text.image_tokens = (tower.image_size // tower.patch_size) ** 2
        return text
    if cfg.tiny is not None:
        from qlora_med.model.build import base_model_dir

        name = str(base_model_dir(cfg))
    else:
        name = cfg.name_or_path
        if cfg.revision is not None and "@" not in name:
            name = f"{name}@{cfg.revision}"
    return load_model_text(name, cfg.image_token, cfg.image_size, template)


def preview_records(
    path: str | Path,
    tokenizer,
    template: str,
    num_image_tokens: int,
    max_length: int,
    image_token: str = "<image>",
    limit: int = 3,
    chat: ChatFormat | None = None,
) -> Preview:
    """Render and encode the first ``limit`` records of a LLaVA-Med JSON/JSONL file (images are not opened);
    ``chat``: the model's chat format, for template ``chat_template``."""
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    records: list[PreviewRecord] = []
    pending: list[tuple[PreviewRecord, list[tuple[str, str]]]] = []
    for number, obj in iter_json_objects(Path(path), tolerant=True):
        if len(records) >= limit:
            break
        if isinstance(obj, InvalidJSON):
            records.append(PreviewRecord(f"#{number}", problem=obj.message))
            continue
        try:
            record = parse_record(obj, Path(), needs_image=False)
        except BadRecord as err:
            rid = obj.get("id", f"#{number}") if isinstance(obj, dict) else f"#{number}"
            records.append(PreviewRecord(str(rid), problem=str(err)))
            continue
        records.append(PreviewRecord(record.id))
        pending.append((records[-1], record.rounds))
    if pending:
        rendered = [
            render(template, rounds, image_token, tokenizer.bos_token, tokenizer.eos_token, chat)
            for _, rounds in pending
        ]
        batch = encode_batch(tokenizer, rendered, image_id, num_image_tokens, max_length)
        end = 0
        for row, ((out, _), one) in enumerate(zip(pending, rendered, strict=True)):
            start, end = end, end + int(batch.lengths[row])
            out.text, out.num_tokens = one.text, int(batch.num_tokens[row])
            out.input_ids, out.labels = batch.input_ids[start:end].tolist(), batch.labels[start:end].tolist()
            if row in batch.image_cut:
                out.problem = batch.image_cut[row]
            elif not batch.answer_tokens[row]:
                out.problem = f"no answer token within max_length={max_length}"
    mode = describe(tokenizer, tokenizer_mode(template))
    return Preview(template, mode, max_length, num_image_tokens, image_id, records)


def preview_file(
    path: str | Path,
    recipe_path: str | Path,
    stage: str | None = None,
    limit: int = 3,
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[Preview, Any]:
    """Preview ``path`` with the template, ``max_length`` and model of a recipe's stage; returns the tokenizer too."""
    from qlora_med.config.loader import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    chosen = stage_of(recipe, stage)
    text = recipe_model_text(recipe.model, chosen.template)
    preview = preview_records(
        path, text.tokenizer, chosen.template, text.image_tokens, chosen.max_length, text.image_token, limit,
        text.chat,
    )
    return preview, text.tokenizer


def _tokens(record: PreviewRecord, tokenizer, image_id: int, colour: bool) -> str:
    """The tokens, trained ones highlighted, runs of image tokens collapsed."""
    pieces = tokenizer.convert_ids_to_tokens(record.input_ids)
    parts: list[str] = []
    items = zip(pieces, record.input_ids, record.labels, strict=True)
    for trained, run in groupby(items, key=lambda item: item[2] != IGNORE_INDEX):
        words = []
        for is_image, same in groupby(run, key=lambda item: item[1] == image_id):
            same = list(same)
            words += [f"{same[0][0]}x{len(same)}"] if is_image else [piece for piece, _, _ in same]
        text = " ".join(words)
        parts.append((f"{TRAINED_COLOUR}{text}{RESET}" if colour else f"[{text}]") if trained else text)
    return " ".join(parts)


def format_text(preview: Preview, tokenizer, colour: bool = False) -> str:
    """The human-readable report."""
    spec = TEMPLATE_SPECS[preview.template]
    lines = [
        f"template {preview.template}: {spec.reproduces}",
        f"tokenizer: {preview.tokenizer_mode['description']}",
        f"max_length {preview.max_length}, {preview.num_image_tokens} image tokens per image; trained tokens "
        + ("in colour" if colour else "in [brackets]"),
    ]
    for i, record in enumerate(preview.records, start=1):
        lines += ["", f"── {i}/{len(preview.records)} {record.id} " + "─" * 20]
        if record.problem is not None and not record.input_ids:
            lines.append(f"unusable: {record.problem}")
            continue
        lines += ["text:", *("  " + line for line in record.text.split("\n"))]
        lines += ["tokens:", "  " + _tokens(record, tokenizer, preview.image_token_id, colour)]
        lines.append(
            f"trained {record.trained}, masked {record.masked}, truncated {record.truncated} "
            f"({record.num_tokens} tokens)"
        )
        if record.problem is not None:
            lines.append(f"unusable in training: {record.problem}")
    return "\n".join(lines)


def format_json(preview: Preview) -> str:
    """The machine-readable report: one JSON object."""
    records = []
    for r in preview.records:
        row: dict[str, Any] = {"id": r.id, "input_ids": r.input_ids, "labels": r.labels}
        if r.problem is not None:
            row["problem"] = r.problem
        records.append(row)
    return json.dumps(
        {
            "template": preview.template,
            "tokenizer_mode": preview.tokenizer_mode,
            "max_length": preview.max_length,
            "num_image_tokens": preview.num_image_tokens,
            "image_token_id": preview.image_token_id,
            "records": records,
        }
    )
