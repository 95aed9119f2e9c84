"""The bench's TRL reference: ``SFTTrainer`` on a VLM with a PEFT config, as TRL's documentation shows it.

Like :mod:`baseline`, it imports nothing from ``qlora_med`` (checked by a test and at run time) and shares only
the measuring stick :mod:`meter`; it runs as a script: ``python qlora_med/bench/trl_reference.py PAYLOAD.json``.

Following TRL's "Training Vision Language Models" and PEFT pages: a conversational vision dataset (``messages`` +
``images`` columns), ``SFTConfig(max_length=None)`` (so image tokens are never cut), the model loaded with a 4-bit
``BitsAndBytesConfig`` (NF4, double quant, compute dtype) and ``peft_config=LoraConfig(target_modules="all-linear")``.
Everything else is TRL's default: its ``DataCollatorForVisionLanguageModeling`` (the processor's chat template,
its image processing, padding), gradient checkpointing on, QLoRA adapters cast to bf16, loss on every non-pad token.
What that trains differs from the kit and the baseline, and the bench says so in its table:

* bitsandbytes quantizes every linear layer it is not told to skip, so the CLIP tower and the projector are NF4
  too (only ``lm_head`` stays full precision);
* ``all-linear`` puts LoRA on the vision tower's and the projector's linear layers as well as the LLM's; the
  projector is not trained in full;
* the labels are the input ids with padding masked: prompt, image placeholders and answers all carry loss.

The only changes from the documented defaults are for a fair measurement: the samples in order
(``train_sampling_strategy="sequential"``), the compute dtype of the machine (``bf16`` only where the others use
it), no checkpoint saving, and a chat template on the processor (the bench model is built from config and has
none; this one writes Mistral-Instruct's ``[INST]`` format with the image first, like llava-v1.6-mistral's).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from meter import StepMeter, training_summary  # the bench's measuring stick: stdlib + torch only

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    " [/INST]{% elif message['role'] == 'assistant' %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %} {{ part['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
)


def to_messages(record: dict) -> list[dict]:
    """A LLaVA-Med record as TRL's conversational format (the image placeholder left to TRL)."""
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[t["from"]], "content": t["value"].replace("<image>", "").strip()}
            for t in record["conversations"]]  # fmt: skip


class Recorder:
    """Wraps TRL's collator to note each batch's real lengths, padding and labelled tokens."""

    def __init__(self, collator) -> None:
        self.collator, self.batches = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.batches.append({"lengths": batch["attention_mask"].sum(1).tolist(), "padded": batch["input_ids"].numel(),
                             "labelled": int((batch["labels"] != -100).sum())})  # fmt: skip
        return batch


def run(payload: dict) -> dict:
    import bitsandbytes  # noqa: F401 - every library imported before the RSS baseline
    import datasets
    import peft
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    meter = StepMeter(payload["warmup"])
    dtype = getattr(torch, payload["dtype"])
    cuda = torch.cuda.is_available()
    model = AutoModelForImageTextToText.from_pretrained(
        payload["model_dir"], dtype=dtype, device_map={"": "cuda" if cuda else "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
    )  # fmt: skip
    processor = AutoProcessor.from_pretrained(payload["model_dir"])
    processor.chat_template = CHAT_TEMPLATE
    records = json.loads(Path(payload["records"]).read_text())[: payload["batch_size"] * (payload["warmup"] +
                                                                                          payload["steps"])]
    folder = Path(payload["images"])
    dataset = datasets.Dataset.from_list(
        [{"messages": to_messages(r), "images": [str(folder / r["image"])]} for r in records]
    ).cast_column("images", datasets.Sequence(datasets.Image()))
    lora = payload["lora"]

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            meter.step_done(state.global_step)

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, max_length=None, per_device_train_batch_size=payload["batch_size"],
            max_steps=payload["warmup"] + payload["steps"], learning_rate=2e-4, logging_steps=1,
            save_strategy="no", report_to="none", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
            use_cpu=not cuda, train_sampling_strategy="sequential", seed=payload["seed"], disable_tqdm=True,
        )  # fmt: skip
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=processor, callbacks=[Timer()],
            peft_config=peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                        target_modules="all-linear", task_type="CAUSAL_LM"),
        )  # fmt: skip
        recorder = Recorder(trainer.data_collator)
        trainer.data_collator = recorder
        trainer.train()
    return {
        **meter.result(), **training_summary(trainer), "batches": recorder.batches,
        "checkpointing": bool(args.gradient_checkpointing), "loss_on": "every non-pad token",
        "kit_modules": sorted(m for m in sys.modules if m == "qlora_med" or m.startswith("qlora_med.")),
    }  # fmt: skip


if __name__ == "__main__":  # python trl_reference.py PAYLOAD.json
    _payload = json.loads(Path(sys.argv[1]).read_text())
    Path(_payload["result"]).write_text(json.dumps(run(_payload)))
