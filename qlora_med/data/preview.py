"""What training sees for the first records of a data file: ``qlora-med data preview``.

Each record is rendered with the recipe stage's template and encoded exactly as the training build encodes it
(:func:`qlora_med.prompts.templates.render` + :func:`~qlora_med.prompts.templates.encode_batch`, the stage's
``max_length``, the model's image tokens and tokenizer). The text report shows the rendered prompt, then the
tokens with the trained ones highlighted (ANSI colour, or ``[brackets]`` when not writing to a terminal) and runs
of image tokens collapsed to ``<image>xN``, and the counts of trained, masked and truncated tokens; the JSON report
gives each record's ``input_ids`` and ``labels`` (image positions as the image token id), the template and the
tokenizer mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from qlora_med.config.schema import ModelConfig, RecipeConfig, StageConfig
from qlora_med.data.records import BadRecord, InvalidJSON, iter_json_objects, parse_record
from qlora_med.errors import ConfigError
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


def model_tokenizer(cfg: ModelConfig) -> tuple[Any, int]:
    """The tokenizer training uses for this model (with the image token) and its image tokens per image.

    A tiny model is built first if missing (seconds); compose mode reads the LLM's tokenizer and the vision
    tower's config; otherwise the model's tokenizer and configs are read (a Hub model: those files only).
    """
    from qlora_med.data.check import load_tokenizer

    if cfg.vision_tower is not None:
        from transformers import AutoConfig

        from qlora_med.model.source import resolve_model

        tokenizer, _ = load_tokenizer(cfg.llm, cfg.image_token)
        tower = AutoConfig.from_pretrained(
            resolve_model(cfg.vision_tower, key="model.vision_tower", weights=False)
        )
        tower = getattr(tower, "vision_config", tower)
        return tokenizer, (tower.image_size // tower.patch_size) ** 2
    if cfg.tiny is not None:
        from qlora_med.model.build import base_model_dir

        return load_tokenizer(str(base_model_dir(cfg)), cfg.image_token)
    name = cfg.name_or_path
    if cfg.revision is not None and "@" not in name:
        name = f"{name}@{cfg.revision}"
    return load_tokenizer(name, cfg.image_token)


def preview_records(
    path: str | Path,
    tokenizer,
    template: str,
    num_image_tokens: int,
    max_length: int,
    image_token: str = "<image>",
    limit: int = 3,
) -> Preview:
    """Render and encode the first ``limit`` records of a LLaVA-Med JSON/JSONL file (images are not opened)."""
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
            render(template, rounds, image_token, tokenizer.bos_token, tokenizer.eos_token)
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
    tokenizer, n_image = model_tokenizer(recipe.model)
    preview = preview_records(
        path, tokenizer, chosen.template, n_image, chosen.max_length, recipe.model.image_token, limit
    )
    return preview, tokenizer


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
