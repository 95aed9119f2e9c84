"""The bench's baseline: the QLoRA loop a user writes by hand with transformers + peft + bitsandbytes.

Shares no code with the kit: it imports nothing from ``qlora_med`` (``tests/unit/bench/test_independence.py`` parses
its imports; at run time it also reports any ``qlora_med`` module found loaded, and the driver refuses such a
result). Its skip list, LoRA target regex, prompt format, label masking, image handling, collation and loss are
written here. The only thing it shares with the other variants is the measuring stick, :mod:`meter` (standard
library + torch), loaded as a sibling module because this file runs as a script::

    python qlora_med/bench/baseline.py PAYLOAD.json

What it does: NF4 + double quant on the LLM's linear layers (vision tower, projector and lm_head skipped), the
compute dtype it is given, ``prepare_model_for_kbit_training`` (fp32 non-quantized weights and, by default, its
gradient checkpointing), ``get_peft_model`` with LoRA on the seven LLM linear layers, the projector trained in full,
``torch.optim.AdamW``; per step it reads the images from disk, pads them to square with the processor's mean colour,
tokenizes the prompt and answers (Mistral ``[INST]`` format, or ``<s><image>caption\\n`` for captions), pads the
batch, takes full logits and a shifted cross-entropy over the answer tokens, ``backward``, ``step``. With a 16-bit
compute dtype the forward runs under ``torch.autocast`` in it, on the GPU and on a CPU with native bf16 alike, as the
HF Trainer's ``bf16=True`` would (``prepare_model_for_kbit_training`` leaves the frozen tower, projector and lm_head
in fp32: without autocast they would compute in fp32).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from meter import StepMeter  # the bench's measuring stick: stdlib + torch only

SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]  # transformers 5 needs full paths
LORA_TARGETS = r"^model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
IGNORE = -100


def load_rgb(path: Path, background: tuple[int, int, int]):
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, background)
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return img.convert("RGB")


def pad_square(img, background: tuple[int, int, int]):
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def encode(record: dict, mix: str, tokenizer, image_id: int, image_tokens: int, max_length: int):
    """Token ids and labels: answers labelled, prompt and image tokens not."""
    turns = record["conversations"]
    pairs = [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids, labels = [tokenizer.bos_token_id], [IGNORE]
    if mix == "align":  # LLaVA stage 1: <s><image>caption\n, the instruction not shown
        ids += [image_id] * image_tokens
        labels += [IGNORE] * image_tokens
        answer = tok(pairs[0][1] + "\n")
        ids, labels = ids + answer, labels + answer
    else:  # Mistral-Instruct: <s>[INST] <image>\nq1 [/INST] a1</s>[INST] q2 [/INST] a2</s>
        for r, (question, answer) in enumerate(pairs):
            if r == 0:
                question = "<image>\n" + question.replace("<image>", "").strip()
            prompt = []
            for k, part in enumerate(f"[INST] {question} [/INST]".split("<image>")):
                prompt += ([image_id] * image_tokens if k else []) + (tok(part) if part else [])
            reply = tok(" " + answer) + [tokenizer.eos_token_id]
            ids += prompt + reply
            labels += [IGNORE] * len(prompt) + reply
    return ids[:max_length], labels[:max_length]


def collate(records: list[dict], payload: dict, processor, image_id: int, image_tokens: int) -> dict:
    background = tuple(int(m * 255) for m in processor.image_processor.image_mean)  # LLaVA's expand2square colour
    folder = Path(payload["images"])
    images = [pad_square(load_rgb(folder / r["image"], background), background) for r in records]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    encoded = [encode(r, payload["mix"], processor.tokenizer, image_id, image_tokens, payload["max_length"])
               for r in records]  # fmt: skip
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(records), width), processor.tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(records), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(records), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values}


def build_model(payload: dict, dtype: torch.dtype, device: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=SKIP_MODULES,
    )  # fmt: skip
    model = LlavaForConditionalGeneration.from_pretrained(
        payload["model_dir"], quantization_config=quant, dtype=dtype, attn_implementation="sdpa",
        device_map={"": device},
    )  # fmt: skip
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=payload["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )  # fmt: skip
    torch.manual_seed(payload["seed"])
    lora = payload["lora"]
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))  # fmt: skip
    for name, param in model.named_parameters():
        if "multi_modal_projector" in name:
            param.requires_grad_(True)
    model.train()
    return model


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def run(payload: dict) -> dict:
    import bitsandbytes  # noqa: F401 - every library imported before the RSS baseline
    import peft  # noqa: F401
    from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: F401

    meter = StepMeter(payload["warmup"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, payload["dtype"])
    processor = AutoProcessor.from_pretrained(payload["model_dir"])
    model = build_model(payload, dtype, device)
    config = model.config
    image_id = config.image_token_id
    image_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    records = json.loads(Path(payload["records"]).read_text())
    b, steps = payload["batch_size"], payload["warmup"] + payload["steps"]
    losses, batches = [], []
    for step in range(1, steps + 1):
        batch = collate(records[(step - 1) * b : step * b], payload, processor, image_id, image_tokens)
        batches.append({"lengths": batch["attention_mask"].sum(1).tolist(), "padded": batch["input_ids"].numel(),
                        "labelled": int((batch["labels"] != IGNORE).sum())})  # fmt: skip
        labels = batch.pop("labels").to(device)
        inputs = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(**inputs).logits
        loss = shifted_cross_entropy(logits, labels)
        del logits
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        del loss
        meter.step_done(step)
    trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    quantized = [n for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")]
    return {
        **meter.result(), "losses": losses, "batches": batches, "trainable": trained, "quantized": quantized,
        "checkpointing": payload["gradient_checkpointing"], "loss_on": "answer tokens",
        "kit_modules": sorted(m for m in sys.modules if m == "qlora_med" or m.startswith("qlora_med.")),
    }  # fmt: skip


if __name__ == "__main__":  # python baseline.py PAYLOAD.json
    _payload = json.loads(Path(sys.argv[1]).read_text())
    Path(_payload["result"]).write_text(json.dumps(run(_payload)))
