"""Generation from a trained model with prompts and images prepared exactly as training prepared them.

A prompt is ``templates.render`` with a final answer of ``None``, tokenized by ``templates.encode``
(image token expanded to the model's number of image features); images go through the training
collator's own preprocessing (EXIF, RGB, pad/crop to square with the processor's mean colour, image
processor). Batches are left-padded; temperature 0 means greedy decoding.

``eval vqa`` settings: named decoding presets (:data:`DECODING_PRESETS`, ``llava-med`` = LLaVA-Med's own
``model_vqa.py``), an optional suffix for CLOSED questions (:func:`ask`); each answer records them with the model
folder, and a prediction file written with others is not resumed (:func:`check_resumable`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_med.data.collate import VisionCollator
from qlora_med.data.records import IMAGE_TOKEN, BadRecord, ImageFolder, iter_json_objects
from qlora_med.errors import DataError, QloraMedError
from qlora_med.prompts.templates import Rendered, encode, render

logger = logging.getLogger(__name__)

# Templates whose answers do not end in EOS: cut the generation at these strings.
STOP_STRINGS: dict[str, list[str]] = {"llava_med_v1": ["###"], "plain": ["\n"]}
# Copied from a test record into the prediction's metadata when present.
_METADATA_KEYS = ("answer_type", "question_type", "type", "domain")


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; ``temperature`` 0 is greedy; ``top_k`` 0 is off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature must be >= 0, top_p in (0, 1] and top_k >= 0")

    def settings(self) -> dict[str, Any]:
        """What decides the answers, as recorded in a prediction file (top_p / top_k None when greedy)."""
        greedy = self.temperature == 0
        return {"temperature": self.temperature, "top_p": None if greedy else self.top_p,
                "top_k": None if greedy else self.top_k, "max_new_tokens": self.max_new_tokens}


# Named decoding settings for `eval vqa --decoding`. "llava-med" is microsoft/LLaVA-Med llava/eval/model_vqa.py's
# defaults: --temperature 0.2, --top_p None (transformers' default 1.0), num_beams 1, max_new_tokens=1024, top_k not
# passed (transformers' default 50), set_seed(0) once; it answers one question at a time (here: --batch-size 1).
DECODING_PRESETS: dict[str, Sampling] = {
    "greedy": Sampling(max_new_tokens=64),
    "llava-med": Sampling(max_new_tokens=1024, temperature=0.2, top_p=1.0, top_k=50),
}
# Named suffixes for `eval vqa --closed-suffix` (anything else is used as written).
CLOSED_SUFFIXES = {"yes-no": "Please answer yes or no."}


def decoding_sampling(
    decoding: str | None, max_new_tokens: int | None = None, temperature: float | None = None,
    top_p: float | None = None,
) -> tuple[str, Sampling]:
    """``(name, Sampling)`` for a preset (its ``max_new_tokens`` unless one is given) or, with ``decoding`` None,
    for explicit settings (name ``greedy`` or ``sampling``). A preset with ``temperature``/``top_p`` is an error."""
    if decoding is not None:
        if decoding not in DECODING_PRESETS:
            raise ValueError(f"unknown decoding {decoding!r}; choose one of {sorted(DECODING_PRESETS)}")
        if temperature is not None or top_p is not None:
            raise ValueError(f"--decoding {decoding} sets temperature and top_p; drop --temperature/--top-p, "
                             "or --decoding to set them yourself")
        preset = DECODING_PRESETS[decoding]
        tokens = preset.max_new_tokens if max_new_tokens is None else max_new_tokens
        return decoding, Sampling(tokens, preset.temperature, preset.top_p, preset.top_k)
    sampling = Sampling(64 if max_new_tokens is None else max_new_tokens, 0.0 if temperature is None else temperature,
                        1.0 if top_p is None else top_p)
    return ("greedy" if sampling.temperature == 0 else "sampling"), sampling


@dataclass(frozen=True)
class Question:
    """One test question: ``text`` is the first human turn as written in the file."""

    id: str
    image: Path
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    raw_id: Any = None  # the id as written in the file (int or str), echoed as question_id
    image_bytes: bytes | None = None  # an embedded image (parquet/Hub test sets); ``image`` is then its name


def load_questions(path: Path, image_folder: Path, allow_outside_images: bool = False) -> list[Question]:
    """Questions from a LLaVA-Med VQA file (``id``, ``conversations``) or qa50 JSONL (``question_id``, ``text``);
    image paths must resolve inside ``image_folder`` unless ``allow_outside_images``."""
    folder = ImageFolder(image_folder, allow_outside_images)
    questions: list[Question] = []
    for number, obj in iter_json_objects(path):
        where = f"{path} record #{number}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object")
        turns = obj.get("conversations", obj.get("conversatons"))
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            rid, text = obj.get("id"), turns[0].get("value")
        else:
            rid, text = obj.get("question_id"), obj.get("text")
        if (
            rid is None
            or not isinstance(text, str)
            or not text.strip()
            or not isinstance(obj.get("image"), str)
        ):
            raise DataError(
                f"{where}: needs 'id' + 'conversations' (VQA) or 'question_id' + 'text' (qa50), and 'image'"
            )
        meta = {k: obj[k] for k in _METADATA_KEYS if k in obj}
        try:
            image = folder.path(obj["image"])
        except BadRecord as bad:
            raise DataError(f"{where}: {bad} (or pass --allow-outside-images)") from None
        questions.append(Question(str(rid), image, text, meta, rid))
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate question ids")
    return questions


def load_table_questions(source) -> list[Question]:
    """Questions from a parquet or Hub test set (a ``DataConfig``; rows read by ``qlora_med.data.tables``).

    Images stay encoded bytes until their batch is answered; rows sharing an image share its bytes.
    """
    import hashlib

    from qlora_med.data.tables import open_table

    table = open_table(source)
    folder = ImageFolder(source.image_folder or ".", getattr(source, "allow_outside_images", False))
    questions: list[Question] = []
    shared: dict[bytes, bytes] = {}
    for number, obj in table.rows():
        text = obj["conversations"][0]["value"]
        data = obj["image_bytes"]
        if not isinstance(text, str) or not text.strip() or (data is None and not obj["image"]):
            raise DataError(f"{table.label} row #{number}: needs a question and an image")
        if data is not None:
            data = shared.setdefault(hashlib.sha1(data).digest(), data)
        try:
            image = Path(obj["image"]) if data is not None else folder.path(obj["image"])
        except BadRecord as bad:
            raise DataError(f"{table.label} row #{number}: {bad} (or pass --allow-outside-images)") from None
        meta = {k: obj[k] for k in _METADATA_KEYS if k in obj}
        questions.append(Question(str(obj["id"]), image, text, meta, obj["id"], data))
    if len({q.id for q in questions}) != len(questions):
        raise DataError(f"{table.label}: duplicate question ids")
    return questions


def _vision_dtype(model) -> torch.dtype:
    for name, param in model.named_parameters():
        if ("vision_tower" in name or ".visual." in name) and param.is_floating_point():
            return param.dtype
    return torch.float32


class Generator:
    """Wraps ``load_trained``'s ``(model, processor, info)`` for batched and streamed generation."""

    def __init__(self, model, processor, info: dict, source: str | None = None) -> None:
        from qlora_med.model.family import chat_format, image_spec

        self.model, self.processor, self.info = model, processor, info
        self.source = source  # the resolved model folder, recorded in prediction files
        self.tokenizer = processor.tokenizer
        self.template: str = info["template"]
        wanted = info.get("image_token") or getattr(processor, "image_token", IMAGE_TOKEN)
        self.images = image_spec(model.config, processor, info.get("image_size"), wanted)  # as in training
        self.image_token: str = self.tokenizer.convert_ids_to_tokens(self.images.image_token_id)
        self.image_token_id = self.images.image_token_id
        self.num_image_tokens = self.images.tokens
        self.chat = chat_format(processor, self.images) if self.template == "chat_template" else None
        self.collator = VisionCollator(processor, info.get("image_aspect", "pad"), images=self.images)
        self.pixel_dtype = _vision_dtype(model)
        text_config = getattr(model.config, "text_config", model.config)
        self.context_length: int = getattr(text_config, "max_position_embeddings", 4096)
        self.stop_strings = STOP_STRINGS.get(self.template, [])
        turn_end = self.images.family.turn_end if self.chat is not None else ""  # e.g. Gemma's <end_of_turn>
        self.stop_ids = [tok_id for tok_id in (self.tokenizer.eos_token_id,
                                               self.tokenizer.convert_tokens_to_ids(turn_end) if turn_end else None)
                         if tok_id is not None]

    @classmethod
    def load(cls, path: str | Path, compute_dtype: str = "auto") -> Generator:
        """Load a run dir, stage ``final/``, checkpoint or merged model (see ``load_trained``)."""
        from qlora_med.artifacts.load import load_trained
        from qlora_med.artifacts.run_dir import resolve_trained

        model, processor, info = load_trained(path, compute_dtype)
        if torch.cuda.is_available() and model.device.type == "cpu":
            model.to("cuda")
        return cls(model, processor, info, str(resolve_trained(path).resolve()))

    # ---------------------------------------------------------------- prompts

    def render(self, rounds: list[tuple[str, str | None]]) -> Rendered:
        """The training render of ``rounds``; a final answer of ``None`` ends at the generation point."""
        if self.image_token != IMAGE_TOKEN and self.chat is None:
            rounds = [(q.replace(IMAGE_TOKEN, self.image_token), a) for q, a in rounds]
        tok = self.tokenizer
        return render(self.template, rounds, self.image_token, tok.bos_token, tok.eos_token, self.chat)

    def prompt_ids(self, rounds: list[tuple[str, str | None]]) -> list[int]:
        """Token ids of the generation prompt, image token expanded as in training."""
        rendered = self.render(rounds)
        return encode(
            self.tokenizer, rendered, self.image_token_id, self.num_image_tokens, sys.maxsize
        ).input_ids

    def chat_prompt(
        self, history: list[tuple[str, str]], question: str, max_new_tokens: int
    ) -> tuple[list[int], list[tuple[str, str | None]]]:
        """Prompt ids for ``question`` after ``history``, dropping the oldest rounds that do not fit.

        Returns the ids and the rounds kept (the image always goes with the first kept question).
        Typed image placeholders are removed: the one image is placed by the template.
        """
        question = question.replace(IMAGE_TOKEN, "").replace(self.image_token, "").strip()
        history = list(history)
        while True:
            rounds: list[tuple[str, str | None]] = [*history, (question, None)]
            ids = self.prompt_ids(rounds)
            if len(ids) + max_new_tokens <= self.context_length or not history:
                return ids, rounds
            history.pop(0)
            logger.warning(
                "conversation longer than the context (%d tokens): dropped the oldest round",
                self.context_length,
            )

    def pixel_values(self, images: list[Path | bytes], ids: list[str]) -> dict[str, torch.Tensor]:
        """Images (files or encoded bytes) preprocessed by the training collator (unreadable: ``DataError``): the
        image inputs the model takes (``pixel_values`` and the family's others)."""
        values, _ = self.collator.image_inputs([p if isinstance(p, bytes) else str(p) for p in images], ids)
        return values

    # ---------------------------------------------------------------- generation

    def _inputs(self, prompts: list[list[int]], image_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        longest = max(map(len, prompts))
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        input_ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends at the last column
            input_ids[row, longest - len(ids) :] = torch.tensor(ids)
            attention_mask[row, longest - len(ids) :] = 1
        device = self.model.device
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        for key, value in image_inputs.items():
            inputs[key] = value.to(device, self.pixel_dtype) if value.is_floating_point() else value.to(device)
        if self.images.family.token_type_ids:
            inputs["token_type_ids"] = (input_ids == self.image_token_id).long().to(device)
        return inputs

    def _generate_kwargs(self, sampling: Sampling) -> dict[str, Any]:
        tok = self.tokenizer
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "do_sample": sampling.temperature > 0,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            "eos_token_id": self.stop_ids,
            "use_cache": True,
        }
        if sampling.temperature > 0:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        else:  # neutralise sampling fields a generation_config.json may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.stop_strings:
            kwargs.update(stop_strings=self.stop_strings, tokenizer=tok)
        return kwargs

    def clean(self, text: str) -> str:
        """Cut at the template's stop strings and strip whitespace."""
        for stop in self.stop_strings:
            text = text.split(stop, 1)[0]
        return text.strip()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], pixel_values: dict[str, torch.Tensor], sampling: Sampling) -> list[str]:
        """Answers for a batch of prompt ids (one image per prompt, in order; ``pixel_values`` from
        :meth:`pixel_values`)."""
        inputs = self._inputs(prompts, pixel_values)
        out = self.model.generate(**inputs, **self._generate_kwargs(sampling))
        new = out[:, inputs["input_ids"].shape[1] :]
        return [self.clean(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def stream(self, prompt: list[int], pixel_values: dict[str, torch.Tensor], sampling: Sampling) -> Iterator[str]:
        """Yield the answer's text as it is generated (stop strings held back and removed)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
        )
        inputs = self._inputs([prompt], pixel_values)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**inputs, **self._generate_kwargs(sampling), streamer=streamer)
            except BaseException as err:  # surfaced in the consumer thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text, shown = "", 0
        hold = max((len(s) for s in self.stop_strings), default=0)
        for chunk in streamer:
            text += chunk
            cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
            visible = text[:cut] if cut >= 0 else text[: max(shown, len(text) - hold)]
            if len(visible) > shown:
                yield visible[shown:]
                shown = len(visible)
            if cut >= 0:
                break
        thread.join()
        if errors:
            raise errors[0]
        if shown < len(text) and not any(s in text for s in self.stop_strings):
            yield text[shown:]


def answer_id(model_id: str, question_id: str, text: str) -> str:
    """A stable id for one answer (the same model, question and text give the same id)."""
    return hashlib.sha1(f"{model_id}\0{question_id}\0{text}".encode()).hexdigest()[:22]


def read_done(out: Path) -> set[str]:
    """Question ids already answered in ``out``; a torn last line (crash mid-write) is cut off."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    done: set[str] = set()
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.strip():
            good += len(line)
            continue
        try:
            obj = json.loads(line)
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
        except ValueError:
            if data[good + len(line) :].strip():
                raise DataError(f"{out}: invalid JSON at byte {good}; fix or delete the file") from None
            logger.warning("%s: dropping a partly written last line", out)
            with out.open("r+b") as fh:
                fh.truncate(good)
            break
        if not isinstance(obj, dict) or "question_id" not in obj:
            raise DataError(f"{out}: a line without 'question_id' at byte {good}; is this a prediction file?")
        done.add(str(obj["question_id"]))
        good += len(line)
    return done


def closed_suffix_text(value: str | None) -> str | None:
    """The text of ``--closed-suffix``: a name from :data:`CLOSED_SUFFIXES` or the text itself (None: none)."""
    if value is None or not value.strip():
        return None
    return CLOSED_SUFFIXES.get(value.strip(), value.strip())


def ask(question: Question, closed_suffix: str | None) -> str:
    """The question as asked: ``closed_suffix`` appended (after a space) to CLOSED questions only, before an image
    placeholder that ends the text (VQA-RAD / SLAKE files write ``question\\n<image>``)."""
    closed = str(question.metadata.get("answer_type", "")).strip().upper() == "CLOSED"
    if not closed_suffix or not closed:
        return question.text
    body = question.text.rstrip()
    placeholder = IMAGE_TOKEN if body.endswith(IMAGE_TOKEN) else ""
    stem = body[: len(body) - len(placeholder)]
    text = stem.rstrip()
    return f"{text} {closed_suffix}{stem[len(text):]}{placeholder}"


# Settings that prediction files written before they were recorded lack, with the value they had then.
_UNRECORDED = {"top_p": None, "top_k": None, "closed_suffix": None}


def answer_settings(
    model: str | None, sampling: Sampling, decoding: str | None = None, closed_suffix: str | None = None,
    template: str | None = None,
) -> dict[str, Any]:
    """What a prediction file records in every answer's metadata: the model folder, the template (left out when
    None: not known before the model loads), decoding and closed-question suffix."""
    settings = {
        "model": model,
        "template": template,
        "decoding": decoding or ("greedy" if sampling.temperature == 0 else "sampling"),
        **sampling.settings(),
        "closed_suffix": closed_suffix,
    }
    if template is None:
        del settings["template"]
    return settings


def check_resumable(out: Path, model_id: str, settings: dict[str, Any]) -> None:
    """Refuse to append to ``out`` when its first answer was written by another model or other settings (those
    in ``settings``)."""
    if not out.is_file():
        return
    with out.open("rb") as fh:
        first = fh.readline()
    try:
        row = json.loads(first)
    except ValueError:
        return  # a torn first line: read_done's business
    if not isinstance(row, dict):
        return
    recorded = {"model_id": row.get("model_id"), **(row.get("metadata") or {})}
    for key, now in {"model_id": model_id, **settings}.items():
        if key == "decoding" or (key not in recorded and key not in _UNRECORDED):
            continue  # a label, or not recorded then (the model folder): nothing to compare
        then = recorded.get(key, _UNRECORDED.get(key))
        if then != now:
            raise QloraMedError(
                f"{out} holds answers from another model or other settings ({key}: {then!r} there, {now!r} now); "
                f"pass a new --out, or delete {out} to start over"
            )


def run_vqa(
    generator: Generator,
    questions: list[Question],
    out: Path,
    model_id: str,
    sampling: Sampling,
    batch_size: int = 8,
    progress: bool = True,
    closed_suffix: str | None = None,
    decoding: str | None = None,
) -> int:
    """Answer ``questions`` not yet in ``out`` (JSONL, appended and flushed per batch); returns how many.

    Every answer records the model and what decides its text (template, decoding, closed-question suffix) in its
    ``metadata``; resuming into a file written with others raises (:func:`check_resumable`).
    """
    from tqdm.auto import tqdm

    settings = answer_settings(generator.source, sampling, decoding, closed_suffix, generator.template)
    check_resumable(out, model_id, settings)
    if closed_suffix and not any(ask(q, closed_suffix) != q.text for q in questions):
        logger.warning("--closed-suffix: no question has answer_type CLOSED; every question is asked as written")
    done = read_done(out)
    todo = [q for q in questions if q.id not in done]
    if done:
        logger.info(
            "%s: %d of %d question(s) already answered, %d to go",
            out,
            len(questions) - len(todo),
            len(questions),
            len(todo),
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as fh, tqdm(total=len(todo), unit="q", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            asked = [ask(q, closed_suffix) for q in batch]
            prompts = [generator.prompt_ids([(text, None)]) for text in asked]
            images = [q.image if q.image_bytes is None else q.image_bytes for q in batch]
            pixels = generator.pixel_values(images, [q.id for q in batch])
            answers = generator.generate(prompts, pixels, sampling)
            for q, question, text in zip(batch, asked, answers, strict=True):
                row = {
                    "question_id": q.raw_id if q.raw_id is not None else q.id,
                    "prompt": question,
                    "text": text,
                    "answer_id": answer_id(model_id, q.id, text),
                    "model_id": model_id,
                    "metadata": {**q.metadata, **settings, "image": q.image.name},
                }
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            bar.update(len(batch))
    return len(todo)
