"""The model card's code, run as written in a process that never imports qlora_med, computes what the kit computes.

Merged model: ``AutoProcessor`` + ``apply_chat_template`` + ``LlavaForConditionalGeneration`` on a non-square sample
image give the kit's prompt ids and training pixels (the saved image processor pads to a square itself) and, for the
NF4-faithful merge, the logits of the kit's own NF4 + LoRA model. PEFT export: the README's quantized base + adapter +
projector reproduce the kit's loaded trained model bit for bit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.trained_run import trained_run
from PIL import Image

from qlora_med.artifacts.export import ExportOptions, export
from qlora_med.artifacts.merge import MergeOptions, merge

ROOT = Path(__file__).resolve().parents[3]
IMAGE = ROOT / "data" / "sample" / "images" / "synpic42202.jpg"  # 203 x 256
QUESTION = "What does this image show?"  # the card's question
STEPS = 5  # greedy tokens compared (the card's max_new_tokens=128 is cut to this to keep the test short)

HARNESS = """
import sys

import torch
with torch.no_grad():
    logits = model(**inputs).logits
torch.save({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "logits": logits,
            "tokens": output[0, inputs["input_ids"].shape[1]:]}, sys.argv[1])
assert "qlora_med" not in sys.modules, "the card's code imported qlora_med"
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir) -> Path:
    return trained_run(tmp_path_factory, tiny_dir)


@pytest.fixture(scope="module")
def kit(run) -> dict:
    """The kit's own forward on the trained run: load_trained + the eval prompt encoding and collator."""
    from qlora_med.eval.generate import Generator, Sampling

    generator = Generator.load(run, "auto")
    ids = generator.prompt_ids([(f"<image>\n{QUESTION}", None)])
    image_inputs = generator.pixel_values([IMAGE], ["sample"])  # pixel_values and the family's other inputs
    inputs = generator._inputs([ids], image_inputs)
    pixels = image_inputs["pixel_values"]
    with torch.no_grad():
        logits = generator.model(**inputs).logits
        tokens = generator.model.generate(**inputs, **generator._generate_kwargs(Sampling(STEPS, 0.0)))
    shapes = [tuple(m.weight.quant_state.shape) for m in generator.model.modules()
              if hasattr(getattr(m, "weight", None), "quant_state")]
    return {"input_ids": ids, "pixel_values": pixels, "logits": logits, "tokens": tokens[0, len(ids):].tolist(),
            "nf4_shapes": shapes}


def _card_code(folder: Path) -> str:
    blocks = re.findall(r"```python\n(.*?)\n```", (folder / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "the card has one python snippet"
    code = blocks[0]
    assert '"scan.png"' in code and "max_new_tokens=128" in code
    return code.replace('"scan.png"', repr(str(IMAGE))).replace("max_new_tokens=128", f"max_new_tokens={STEPS}")


def _run_plain(folder: Path, tmp_path: Path) -> dict:
    """The card's code in a fresh interpreter, from the folder's parent (the card names the folder relatively)."""
    script, result = tmp_path / f"{folder.name}_card.py", tmp_path / f"{folder.name}_plain.pt"
    script.write_text(_card_code(folder) + "\n" + HARNESS)
    proc = subprocess.run([sys.executable, str(script), str(result)], cwd=folder.parent, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result)


def test_merged_card_code_reproduces_pixels_and_logits_of_the_trained_model(run, kit, tmp_path):
    """NF4-faithful merge: plain transformers == the kit's NF4 + LoRA model (same pixels, logits <= 1e-4)."""
    from transformers import AutoProcessor

    out = tmp_path / "merged"
    merge(run, out, MergeOptions(dtype="fp32", nf4_faithful=True))
    config = json.loads((out / "processor_config.json").read_text())["image_processor"]
    assert config["image_processor_type"] == "LlavaImageProcessor" and config["do_pad"] is True
    plain = _run_plain(out, tmp_path)

    assert plain["input_ids"][0].tolist() == kit["input_ids"]
    assert torch.equal(plain["pixel_values"], kit["pixel_values"])  # the padded training pixels, bit for bit
    diff = (plain["logits"] - kit["logits"]).abs().max().item()
    assert diff <= 1e-4, diff
    assert plain["tokens"].tolist() == kit["tokens"]

    # what the fix is for: the processor training saved (CLIP: resize + centre crop) sees other pixels
    image = Image.open(IMAGE).convert("RGB")
    cropped = AutoProcessor.from_pretrained(run / "instruct" / "final").image_processor(image, return_tensors="pt")
    assert not torch.equal(cropped["pixel_values"], kit["pixel_values"])


def test_peft_readme_code_reproduces_the_trained_model_bit_for_bit(run, kit, tiny_dir, tmp_path):
    from qlora_med.patches import bnb_cpu

    out = tmp_path / "peft"
    export(run, out, ExportOptions(format="peft"))
    readme = (out / "README.md").read_text()
    assert "BitsAndBytesConfig(" in readme and '"model.multi_modal_projector"' in readme
    assert "os.path.isdir(adapter)" in readme and "hf_hub_download(adapter" in readme
    # bitsandbytes' AVX-512 CPU dequantize mis-blocks rows that are not a multiple of 64 (qlora_med.patches.bnb_cpu);
    # a plain process has no correction, so bit-for-bit parity on an AVX-512 CPU holds only for unaffected shapes.
    # The tiny LLM's linears (in 64 or 128) are all unaffected.
    assert kit["nf4_shapes"] and not any(bnb_cpu.affected(s, 64) for s in kit["nf4_shapes"]), kit["nf4_shapes"]
    plain = _run_plain(out, tmp_path)

    assert plain["input_ids"][0].tolist() == kit["input_ids"]
    assert torch.equal(plain["pixel_values"], kit["pixel_values"])
    assert torch.equal(plain["logits"], kit["logits"]), (plain["logits"] - kit["logits"]).abs().max().item()
    assert plain["tokens"].tolist() == kit["tokens"]


def test_hf_round_trip_keeps_the_padding_processor_and_the_transformers_card(run, tmp_path):
    from transformers import AutoProcessor

    merged, llava_med, back = tmp_path / "merged", tmp_path / "llava-med", tmp_path / "hf"
    merge(run, merged, MergeOptions(dtype="fp32"))
    export(merged, llava_med, ExportOptions(format="llava-med"))
    tower = json.loads((llava_med / "vision_tower" / "preprocessor_config.json").read_text())
    assert tower["image_processor_type"] == "CLIPImageProcessor" and "do_pad" not in tower  # LLaVA-Med pads itself
    export(llava_med, back, ExportOptions(format="hf"))
    image = Image.open(IMAGE).convert("RGB")
    ours, theirs = (AutoProcessor.from_pretrained(d).image_processor(image, return_tensors="pt")["pixel_values"]
                    for d in (merged, back))
    assert torch.equal(ours, theirs)
    card = (back / "README.md").read_text()
    assert "library_name: transformers" in card and 'from_pretrained("hf"' in card and "do_pad=True" in card


def test_padding_processor_pads_like_the_collator_for_pad_models_only(processor, tmp_path):
    import copy

    from qlora_med.artifacts.merge import clip_processor, padding_processor
    from qlora_med.data.collate import VisionCollator

    assert padding_processor(copy.deepcopy(processor), "crop").image_processor.to_dict() == \
        processor.image_processor.to_dict()
    padded = padding_processor(copy.deepcopy(processor), "pad")
    assert type(padded.image_processor).__name__ == "LlavaImageProcessorPil" and padded.image_processor.do_pad
    names = ["synpic32933.jpg", "xy_chromosome.jpg", "cell.png", "ihc.png"]  # tall, wide, greyscale, square
    paths = [str(ROOT / "data" / "sample" / "images" / n) for n in names]
    kit = VisionCollator(processor, "pad").pixel_values(paths, names)[0]
    images = [Image.open(p).convert("RGB") for p in paths]
    assert torch.equal(padded.image_processor(images, return_tensors="pt")["pixel_values"], kit)
    back = clip_processor(padded.image_processor)
    assert type(back).__name__ == "CLIPImageProcessorPil" and not getattr(back, "do_pad", False)
    assert back.to_dict() == processor.image_processor.to_dict()


def test_peft_card_warns_when_bitsandbytes_cpu_dequantize_is_wrong_for_the_base(tmp_path):
    from qlora_med.artifacts.card import _bnb_cpu_affected

    for hidden, intermediate, affected in [(64, 128, False), (4096, 14336, False), (96, 128, True), (64, 200, True)]:
        folder = tmp_path / f"{hidden}-{intermediate}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"text_config": {
            "hidden_size": hidden, "intermediate_size": intermediate, "num_attention_heads": 4}}))
        assert _bnb_cpu_affected(str(folder)) is affected, (hidden, intermediate)
    assert _bnb_cpu_affected(str(tmp_path / "missing")) is False and _bnb_cpu_affected(None) is False
