"""What a recipe may say: its typed dataclasses and every rule on their values (no file access).

Precedence: dataclass defaults < stage-kind presets (``qlora_med.config.stages``) < YAML < overrides
(read by ``qlora_med.config.loader``). Every key is documented once, in its field's ``metadata["help"]``.
Each ``__post_init__`` checks its values and combinations (e.g. a stage with nothing to train) and
reports all of its problems together (``qlora_med.config.problems``); whether the files a recipe names
exist is ``qlora_med.config.files``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from qlora_med.config.families import FAMILIES
from qlora_med.config.problems import raise_problems
from qlora_med.config.sources import MAX_IMAGE_PIXELS, PIL_BOMB_PIXELS, source_problems
from qlora_med.config.stages import STAGE_PRESETS, TrainSpec
from qlora_med.errors import ConfigError
from qlora_med.prompts.templates import TEMPLATES


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:  # noqa: A002
    """A dataclass field with documentation."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    if dataclasses.is_dataclass(default):
        value = default
        return field(default_factory=lambda: dataclasses.replace(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TinyModelConfig:
    """Builds a tiny VLM of a supported family from config (demo and tests): LLaVA is CLIP + Mistral with the
    real Mistral-v0.2 tokenizer; the other families' sizes are in ``qlora_med.model.tiny``."""

    family: str = _f("llava", "VLM family (qlora_med.config.families): llava, llava_next, qwen2_5_vl, gemma3")

    image_size: int = _f(56, "vision input size in pixels")
    patch_size: int = _f(14, "ViT patch size")
    vision_hidden: int = _f(32, "CLIP hidden size")
    vision_layers: int = _f(2, "CLIP encoder layers")
    vision_heads: int = _f(2, "CLIP attention heads")
    text_hidden: int = _f(64, "Mistral hidden size")
    text_intermediate: int = _f(128, "Mistral MLP size")
    text_layers: int = _f(2, "Mistral decoder layers")
    text_heads: int = _f(4, "Mistral attention heads")
    text_kv_heads: int = _f(2, "Mistral key/value heads")
    lm_head_std: float = _f(0.2, "init std of the (frozen) lm_head; large enough for LoRA to move logits")
    seed: int = _f(0, "initialisation seed")

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise_problems([f"model.tiny.family: unknown family '{self.family}'; choose one of {sorted(FAMILIES)}"])

    @property
    def merged_side(self) -> int:
        """The square side a tiny Qwen's images are resized to: ``image_size`` rounded down to its 2x2 patch merge."""
        step = 2 * self.patch_size
        return self.image_size // step * step


@dataclass
class ModelConfig:
    """Where the LLaVA comes from and how it is quantized."""

    name_or_path: str | None = _f(
        None,
        "LLaVA checkpoint: a local folder, or a Hub id org/name[@revision] downloaded into the HF cache "
        "(HF_HUB_CACHE); HF layout (model_type llava: LlavaForConditionalGeneration + processor) or LLaVA's "
        "original layout (llava_mistral / llava_llama, e.g. microsoft/llava-med-v1.5-mistral-7b)",
    )
    revision: str | None = _f(
        None,
        "Hub branch, tag or commit of name_or_path (default: the main branch); same as org/name@revision",
    )
    allow_pickle: bool = _f(
        False,
        "accept pickle weights (.bin/.pt: loading them can run code) from Hub repos without safetensors",
    )
    vision_tower: str | None = _f(
        None, "compose mode: CLIP vision model, a local folder or Hub id org/name[@rev]"
    )
    llm: str | None = _f(None, "compose mode: LLM (Mistral or Llama family), a local folder or Hub id")
    projector_type: Literal["linear", "mlp2x_gelu"] = _f("mlp2x_gelu", "compose mode: fresh projector type")
    vision_feature_layer: int = _f(-2, "compose mode: CLIP layer whose features feed the projector")
    image_token: str = _f("<image>", "placeholder token for the image in prompts")
    image_aspect: Literal["pad", "crop"] = _f(
        "pad", "pad to square with the processor mean colour (LLaVA-Med v1.5) or centre-crop"
    )
    image_size: int | None = _f(
        None,
        "any-res / dynamic-resolution families (LLaVA-NeXT, Qwen2.5-VL): square side every image is resized to "
        "after image_aspect (default: the family's, e.g. 672 / 448); fixed-size towers ignore it",
    )
    tiny: TinyModelConfig | None = _f(None, "build a tiny model from config into name_or_path (demo/tests)")
    quantization: Literal["nf4", "int8", "none"] = _f("nf4", "LLM linear layers: NF4 (QLoRA), int8, or none")
    double_quant: bool = _f(True, "NF4 double quantization of the absmax constants")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "auto: bf16 on GPUs that support it, fp32 on CPUs without native bf16"
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = _f(
        "auto", "auto: flash_attention_2 when flash-attn is installed on CUDA, else sdpa"
    )
    cache_dir: str = _f(".cache/qlora-med", "where composed and tiny models are built once")

    def __post_init__(self) -> None:
        sources = [self.name_or_path is not None, self.vision_tower is not None or self.llm is not None]
        problems = []
        if not any(sources):
            problems.append("model: set model.name_or_path, or model.vision_tower + model.llm to compose")
        elif sources[1] and (self.vision_tower is None or self.llm is None):
            problems.append("model: compose mode needs both model.vision_tower and model.llm")
        elif all(sources):
            problems.append("model: set either model.name_or_path or model.vision_tower + model.llm, not both")
        if self.image_size is not None and self.image_size <= 0:
            problems.append(f"model.image_size: must be a positive number of pixels, got {self.image_size}")
        if self.tiny is not None and self.name_or_path is None:
            problems.append("model.tiny: needs model.name_or_path (the directory to build the tiny model in)")
        if self.revision is not None:
            pinned = (self.name_or_path or "").partition("@")[2]
            if not self.revision.strip() or any(c.isspace() for c in self.revision):
                problems.append(f"model.revision: '{self.revision}' is not a branch, tag or commit")
            elif self.name_or_path is None:
                problems.append(
                    "model.revision: pins model.name_or_path only; in compose mode write "
                    "org/name@revision in model.vision_tower / model.llm"
                )
            elif self.tiny is not None:
                problems.append("model.revision: a tiny model is built locally, it has no Hub revision")
            elif pinned and pinned != self.revision:
                problems.append(
                    f"model.revision: '{self.revision}' differs from the '@{pinned}' in "
                    f"model.name_or_path '{self.name_or_path}'; give the revision once"
                )
        raise_problems(problems)


@dataclass
class LoraConfig:
    """LoRA adapters on the LLM's linear layers (never on the vision tower or projector)."""

    r: int = _f(16, "adapter rank")
    alpha: int = _f(32, "scaling numerator (scale = alpha / r)")
    dropout: float = _f(0.05, "dropout on the adapter input")
    target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "LLM linear layer names to adapt (default: all of them)",
    )

    def __post_init__(self) -> None:
        problems = []
        if self.r <= 0 or self.alpha <= 0:
            problems.append(f"lora: r and alpha must be positive, got r={self.r} alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            problems.append("lora.target_modules is empty: list the LLM linear layers to adapt")
        raise_problems(problems)


@dataclass
class KernelsConfig:
    """Fused kernels and the loss path; each choice is resolved for the device and logged at start-up."""

    liger: Literal["auto", "on", "off"] = _f(
        "auto", "Liger RMSNorm/RoPE/SwiGLU in the LLM. auto: on where Triton compiles (CUDA), off on CPU"
    )
    nf4_lora: Literal["auto", "on", "off"] = _f(
        "auto",
        "fused NF4 dequant + matmul + LoRA forward/backward for the LLM's LoRA layers. auto/on: Triton on "
        "CUDA, the same autograd function with a PyTorch matmul on CPU (as fast as PEFT there, less memory); "
        "on: also requires model.quantization nf4",
    )
    loss: Literal["auto", "chunked", "trl", "full"] = _f(
        "auto",
        "chunked: our chunked linear cross-entropy over labelled tokens only (no entropy/accuracy metrics); "
        "trl: SFTTrainer's fused LM head (with metrics); full: plain logits. auto: chunked on CPU, trl on CUDA",
    )
    chunk_size: int | None = _f(None, "rows per chunk of the chunked loss; default: ~64 MiB of fp32 logits")

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise_problems([f"kernels.chunk_size must be positive or null, got {self.chunk_size}"])


@dataclass
class DataConfig:
    """One training data source; a stage may mix several (see ``weight``). Kinds: ``qlora_med.config.sources``."""

    path: str | None = _f(
        None, "JSON list or JSONL of LLaVA-Med records; or parquet with one question per row: a .parquet "
        "file, a glob (data/vqa_rad/*.parquet) or a folder of them (its `split` found by file name, as on the Hub)"
    )
    image_folder: str | None = _f(
        None, "folder the records' `image` paths are relative to; parquet/Hub sources need it only when "
        "their image column holds paths instead of embedded images"
    )
    hf: str | None = _f(None, "instead of path: a Hub dataset id org/name (e.g. flaviagiammarino/vqa-rad), "
                        "read with `datasets` into the HF cache; HF_HUB_OFFLINE=1 uses the cache only")
    split: str = _f("train", "split of a Hub dataset or parquet folder")
    revision: str | None = _f(None, "Hub dataset branch, tag or commit (default: the main branch)")
    columns: dict[str, str] = _f(
        {}, "parquet/Hub column names by field: image, question, answer, answer_type, id, question_type, "
        "language (e.g. {image: img_name}); a field not named takes its default column "
        "(qlora_med.config.sources.TABLE_COLUMNS); no answer_type column: CLOSED for yes/no answers, else OPEN"
    )
    language: str | None = _f("en", "parquet/Hub sources with a language column (SLAKE's q_lang): keep only "
                              "rows in this language; null keeps all")
    name: str | None = _f(
        None, "label in logs; in a list of sources, the override address (stages.S.data.NAME.weight=2)"
    )
    weight: float = _f(
        1.0,
        "samples drawn from this source per epoch = round(weight x its usable samples): 2 uses every "
        "sample twice, 0.5 a random half fixed by the recipe seed (qlora_med.data.build.draw_indices)",
    )
    on_bad_record: Literal["error", "skip"] = _f(
        "error", "error: stop at the first unusable record; skip: count, log and drop it"
    )
    verify_images: bool = _f(False, "decode every image once before training (each image's header is read anyway)")
    max_records: int | None = _f(None, "use only the first N records (smoke runs)")
    allow_outside_images: bool = _f(
        False, "accept `image` paths that lead out of image_folder (absolute paths, '..', symlinks to elsewhere); "
        "off: such a record is a problem (reason image_outside), as in data check"
    )
    max_image_pixels: int = _f(
        MAX_IMAGE_PIXELS, "an image with more pixels (width x height, read from its header before decoding) is a "
        f"problem (reason image_too_large, skippable); default 40 MP, at most {PIL_BOMB_PIXELS} (PIL's "
        "decompression-bomb limit). Images over 2048 px a side are shrunk to it once, when the source is cached"
    )


@dataclass
class StageConfig:
    """One curriculum stage. Unset fields come from the stage kind's preset in ``qlora_med.config.stages``."""

    name: str = _f(help="stage name: output subfolder and override address (stages.NAME.key=value)")
    kind: Literal["align", "instruct", "vqa"] = _f(help="align (stage 1), instruct (stage 2) or vqa fine-tune")
    data: DataConfig | list[DataConfig] = _f(
        help="training data: one source, or a list of sources mixed by their `weight` (a list once loaded)"
    )
    template: str | None = _f(None, f"prompt template: one of {sorted(TEMPLATES)}")
    train: TrainSpec | None = _f(None, "what the stage trains: projector full|frozen, llm lora|frozen")
    init_from: str | None = _f(
        None, "a stage 'final/' dir to start from (projector, adapters); default: the previous stage here"
    )
    learning_rate: float | None = _f(None, "LoRA adapter learning rate")
    projector_lr: float | None = _f(None, "projector learning rate (its own optimizer param group)")
    num_epochs: float = _f(1.0, "epochs over the data")
    max_steps: int = _f(-1, "optimizer steps; -1 means use num_epochs")
    per_device_batch_size: int | Literal["auto"] = _f(
        4, "micro-batch per device; auto: the memory planner picks it to fit the device (keeps global_batch_size)"
    )
    gradient_accumulation_steps: int | Literal["auto"] = _f(
        1, "micro-batches per optimizer step; auto: global_batch_size / (micro-batch x devices)"
    )
    global_batch_size: int | None = _f(
        None, "samples per optimizer step over all processes, kept for any process count: accumulation auto is "
        "derived from it, fixed values are checked against it; unset: micro-batch x accumulation x processes"
    )
    max_length: int = _f(2048, "token limit incl. image tokens; longer samples are truncated")
    warmup_ratio: float = _f(0.03, "linear warm-up share of the steps")
    lr_scheduler: str = _f("cosine", "transformers scheduler name")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    optim: str = _f("adamw_torch", "transformers optimizer name, e.g. adamw_torch, paged_adamw_8bit")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    gradient_checkpointing: bool | Literal["auto"] = _f(
        "auto", "recompute activations in backward to save memory; auto: off when the memory planner's step fits "
        "the device without it, else on (decided at start-up, logged, recorded in stage.json)"
    )
    save_steps: int = _f(500, "checkpoint every N optimizer steps")
    save_total_limit: int = _f(2, "complete checkpoints kept per stage")
    logging_steps: int = _f(10, "log loss every N steps")
    dataloader_workers: int = _f(0, "DataLoader worker processes (image decoding)")
    sampling: Literal["auto", "random", "group_by_length"] = _f(
        "auto", "order of samples: random, or group_by_length (micro-batches of similar lengths: less padding, "
        "as LLaVA's own scripts group); auto: group_by_length when batches are padded, random when packed"
    )
    padding_free: bool | Literal["auto"] = _f(
        "auto",
        "pack each micro-batch into one row (position_ids restart per sample, attention kept within each "
        "sample): no compute on padding, same loss as padded batches (qlora_med.data.packing); auto: on where "
        "the family and the attention implementation can pack rows (logged, recorded in stage.json)",
    )

    def __post_init__(self) -> None:
        self.data = [self.data] if isinstance(self.data, DataConfig) else list(self.data)
        preset = STAGE_PRESETS[self.kind]
        self.template = self.template or preset.template
        self.train = self.train or dataclasses.replace(preset.train)
        self.learning_rate = self.learning_rate if self.learning_rate is not None else preset.learning_rate
        self.projector_lr = self.projector_lr if self.projector_lr is not None else preset.projector_lr
        where = f"stages.{self.name}"
        problems = []
        if not self.data:
            problems.append(f"{where}.data: no data sources; give a mapping or a list of them")
        for data_where, source in zip(data_addresses(self), self.data, strict=True):
            problems += source_problems(source, data_where)
            if not (math.isfinite(source.weight) and source.weight > 0):
                problems.append(f"{data_where}.weight must be a positive number, got {source.weight}")
            if source.max_records is not None and source.max_records <= 0:
                problems.append(f"{data_where}.max_records must be positive or null, got {source.max_records}")
        names = [s.name for s in self.data if s.name is not None]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"{where}.data: duplicate source names {dupes}; names must be unique")
        if self.template not in TEMPLATES:
            near = difflib.get_close_matches(self.template, TEMPLATES, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            problems.append(
                f"{where}.template: unknown template '{self.template}'{hint}; choose one of {sorted(TEMPLATES)}"
            )
        elif self.template == "plain" and self.kind != "align":
            problems.append(
                f"{where}.template: 'plain' (image then caption) is for align stages; "
                "use mistral_instruct, vicuna_v1 or llava_med_v1"
            )
        if self.train.projector == "frozen" and self.train.llm == "frozen":
            problems.append(f"{where}.train: nothing to train (projector and llm both frozen)")
        if self.per_device_batch_size == "auto" and self.gradient_accumulation_steps != "auto":
            problems.append(
                f"{where}: per_device_batch_size auto needs gradient_accumulation_steps auto too "
                "(the planner picks them together to keep global_batch_size)"
            )
        if self.gradient_accumulation_steps == "auto" and self.global_batch_size is None:
            problems.append(
                f"{where}: gradient_accumulation_steps auto is derived from global_batch_size; set it "
                "(the paper's is 128)"
            )
        for key in ("per_device_batch_size", "gradient_accumulation_steps", "max_length", "save_steps",
                    "global_batch_size"):
            if getattr(self, key) not in ("auto", None) and getattr(self, key) <= 0:
                problems.append(f"{where}.{key} must be positive, got {getattr(self, key)}")
        for key in ("learning_rate", "projector_lr", "num_epochs", "max_grad_norm"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                problems.append(f"{where}.{key} must be a positive finite number, got {value}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"{where}.weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"{where}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"{where}.max_steps must be -1 (use num_epochs) or positive")
        raise_problems(problems)


def data_addresses(stage: StageConfig) -> list[str]:
    """Where each data source of a stage is written in a recipe (for error messages)."""
    if len(stage.data) == 1:
        return [f"stages.{stage.name}.data"]
    return [f"stages.{stage.name}.data.{s.name}" if s.name else f"stages.{stage.name}.data[{i}]"
            for i, s in enumerate(stage.data)]


@dataclass
class RecipeConfig:
    """A whole run: the model, the adapters and the curriculum stages, in order."""

    output_dir: str = _f(help="run directory: one subfolder per stage")
    model: ModelConfig = _f(help="base model")
    stages: list[StageConfig] = _f(help="curriculum stages, run in order")
    lora: LoraConfig = _f(LoraConfig(), "LoRA adapter settings")
    seed: int = _f(42, "seed for adapter init, data order and dropout")
    report_to: Literal["none", "tensorboard", "wandb", "mlflow", "trackio"] = _f(
        "none", "experiment tracker the HF Trainer logs to (tensorboard: <output_dir>/<stage>/runs/); its "
        "package must be installed"
    )
    kernels: KernelsConfig = _f(KernelsConfig(), "fused kernels and loss path (qlora_med.patches.select)")

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        problems = []
        if not names:
            problems.append("stages: the recipe has no stages")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"stages: duplicate stage names {dupes}; names must be unique")
        if self.kernels.nf4_lora == "on" and self.model.quantization != "nf4":
            problems.append(
                f"kernels.nf4_lora: 'on' needs model.quantization: nf4 (it is '{self.model.quantization}'); "
                "use 'auto' or 'off'"
            )
        raise_problems(problems)

    def stage(self, name: str) -> StageConfig:
        """The stage called ``name``, or a ConfigError naming the valid ones."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"no stage '{name}' in the recipe; stages are {[s.name for s in self.stages]}")
