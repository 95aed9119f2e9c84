"""``qlora-med merge``: key mapping, NF4 faithfulness, logit parity, plain-transformers loading, sharding.

Parity (same image + prompt batch, fp32, logits over all non-pad positions), against the trained
model as ``load_trained`` serves it (NF4 base + LoRA + trained projector):

* ``--nf4-faithful``: max |diff| < 1e-4 and 100% top-1 agreement (float rounding only; ~3e-6 seen).
* original base: the diff is the NF4 rounding error of the base the adapter was trained on, so it is
  bounded by 2x that error measured directly (NF4 base vs fp32 base, both without LoRA), and must be
  under half the diff of the *unmerged* model (fp32 base + trained projector, no LoRA), which shows
  the LoRA delta really is in the merged weights. Measured on the tiny model (64 positions): faithful
  3.8e-6 / 100% top-1; original 1.14 / 75%; unmerged 5.98 / 30%; NF4 error of the base 1.18.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.trained_run import trained_run
from safetensors.torch import load_file, save_file

from qlora_med import cli
from qlora_med.artifacts.merge import MergeOptions, load_lora, merge, nf4_roundtrip, quantized_linear_weights
from qlora_med.artifacts.shards import ShardWriter, canonical_key
from qlora_med.errors import QloraMedError
from qlora_med.prompts.templates import render

ROOT = Path(__file__).resolve().parents[3]
IMAGES = ["cell.png", "ihc.png"]
QUESTIONS = ["What modality is this?", "Describe the findings in detail."]

# Runs without qlora_med: plain transformers, as a user of the merged model would.
PLAIN_LOAD = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

inputs = torch.load(sys.argv[1])
models, image_path, question, out = json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
report = {}
for name, path in models.items():
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    own = processor(images=Image.open(image_path).convert("RGB"), text=prompt, add_special_tokens=False,
                    return_tensors="pt")
    with torch.no_grad():
        torch.save(model(**inputs).logits, f"{out}/{name}.pt")
        generated = model.generate(**own, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    report[name] = {"prompt": prompt, "input_ids": own["input_ids"][0].tolist(),
                    "new_tokens": generated.shape[1] - own["input_ids"].shape[1]}
report["qlora_med_imported"] = sorted(m for m in sys.modules if m.startswith("qlora_med"))
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir) -> Path:
    return trained_run(tmp_path_factory, tiny_dir)


def _batch(processor):
    from PIL import Image

    images = [Image.open(ROOT / "data" / "sample" / "images" / n).convert("RGB").resize((56, 56)) for n in IMAGES]
    texts = [render("mistral_instruct", [(q, None)], "<image>").text for q in QUESTIONS]
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _compare(logits: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    diff = (logits - ref)[mask].abs().max().item()
    top1 = (logits.argmax(-1) == ref.argmax(-1))[mask].float().mean().item()
    return diff, top1


def test_checkpoint_and_adapter_keys_map_to_model_names(tiny_dir, run):
    from transformers import AutoConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        names = set(LlavaForConditionalGeneration(AutoConfig.from_pretrained(tiny_dir)).state_dict())
    on_disk = load_file(tiny_dir / "model.safetensors")
    assert {canonical_key(k) for k in on_disk} == names  # transformers 5 on-disk layout, verified on the file
    lora = load_lora(run / "instruct" / "final")
    assert lora is not None and set(lora.factors) <= names and len(lora.factors) == 14  # 7 linears x 2 layers
    assert lora.scale == 2.0  # alpha 32 / r 16
    # transformers 4 / Hub llava-hf layouts
    assert canonical_key("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == \
        "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert canonical_key("language_model.lm_head.weight") == "lm_head.weight"
    assert canonical_key("model.language_model.norm.weight") == "model.language_model.norm.weight"


def test_nf4_roundtrip_is_what_training_saw(tiny_dir, run):
    """The faithful base equals bitsandbytes' dequantized Linear4bit weights of the trained model, bit for bit."""
    import bitsandbytes as bnb

    from qlora_med.artifacts.load import load_trained

    model, _, _ = load_trained(run)
    base = load_file(tiny_dir / "model.safetensors")
    by_canonical = {canonical_key(k): v for k, v in base.items()}
    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            key = name.replace("base_model.model.", "").replace(".base_layer", "") + ".weight"
            live = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert torch.equal(nf4_roundtrip(by_canonical[key], torch.float32, True), live), key
            seen.add(key)
    assert seen == quantized_linear_weights(tiny_dir) and len(seen) == 14


def test_merge_parity_and_plain_transformers_load(run, tiny_dir, tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    from qlora_med.artifacts.load import load_trained

    original, faithful = tmp_path / "merged", tmp_path / "merged-nf4"
    assert cli.main(["merge", str(run), "--out", str(original), "--dtype", "fp32"]) == 0
    assert "LoRA layers       14" in capsys.readouterr().out
    merge(run, faithful, MergeOptions(dtype="fp32", nf4_faithful=True))

    trained, processor, _ = load_trained(run)
    inputs = _batch(processor)
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = trained(**inputs).logits
        with trained.disable_adapter():
            nf4_no_lora = trained(**inputs).logits
        unmerged = LlavaForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval()
        for name, tensor in load_file(run / "instruct" / "final" / "projector.safetensors").items():  # full paths
            unmerged.get_parameter(name).data = tensor.float()
        fp_no_lora = unmerged(**inputs).logits

    torch.save(dict(inputs), tmp_path / "inputs.pt")
    image, question = ROOT / "data" / "sample" / "images" / IMAGES[0], QUESTIONS[0]
    models = json.dumps({"original": str(original), "faithful": str(faithful)})
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "inputs.pt"), models, str(image), question,
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["qlora_med_imported"] == []

    faithful_diff, faithful_top1 = _compare(torch.load(tmp_path / "faithful.pt"), ref, mask)
    original_diff, original_top1 = _compare(torch.load(tmp_path / "original.pt"), ref, mask)
    nf4_error, _ = _compare(nf4_no_lora, fp_no_lora, mask)
    unmerged_diff, unmerged_top1 = _compare(fp_no_lora, ref, mask)
    print(f"\nlogits vs trained NF4+LoRA model (max |diff|, top-1 agreement over {int(mask.sum())} positions):"
          f"\n  nf4-faithful merge  {faithful_diff:.2e}  {faithful_top1:.3f}"
          f"\n  original merge      {original_diff:.2e}  {original_top1:.3f}"
          f"\n  unmerged (no LoRA)  {unmerged_diff:.2e}  {unmerged_top1:.3f}"
          f"\n  NF4 error of base   {nf4_error:.2e}  (NF4 vs fp32 base, both without LoRA)")
    assert faithful_diff < 1e-4 and faithful_top1 == 1.0
    assert original_diff < 2.0 * nf4_error
    assert original_diff < 0.5 * unmerged_diff and unmerged_diff > 1.0  # the LoRA delta is in the weights

    # HF-native use: the saved chat template reproduces the training template and tokenization
    want = render("mistral_instruct", [(question, None)], "<image>").text
    from PIL import Image

    own = processor(images=Image.open(image).convert("RGB"), text=want, add_special_tokens=False, return_tensors="pt")
    for name in ("original", "faithful"):
        assert report[name]["prompt"] == want
        assert report[name]["input_ids"] == own["input_ids"][0].tolist()
        assert report[name]["new_tokens"] == 4
    meta = json.loads((original / "qlora_med.json").read_text())
    assert meta["template"] == "mistral_instruct" and meta["merge"] == "original" and meta["stages"][0]["stage"] == "instruct"
    assert load_trained(original)[2]["template"] == "mistral_instruct"  # eval commands read the metadata
    card = (original / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "Not for clinical use" in card and "instruct" in card


def test_sharded_input_and_output_bf16(run, tiny_dir, tmp_path):
    """Several input shards in, several output shards + index out; bf16 = the fp32 merge cast."""
    from transformers import LlavaForConditionalGeneration

    base = tmp_path / "base-sharded"
    shutil.copytree(tiny_dir, base, ignore=shutil.ignore_patterns("model.safetensors"))
    writer = ShardWriter(base, 3_000_000)
    for key, value in load_file(tiny_dir / "model.safetensors").items():
        writer.add(key, value)
    assert len(writer.finish()) > 2
    single = merge(run, tmp_path / "fp32", MergeOptions(dtype="fp32"))
    sharded = merge(run, tmp_path / "bf16", MergeOptions(dtype="bf16", max_shard_size="2MB", base_model=str(base)))
    assert len(single.shards) == 1 and len(sharded.shards) > 2
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(sharded.shards)
    want = load_file(tmp_path / "fp32" / "model.safetensors")
    got = {k: v for name in sharded.shards for k, v in load_file(tmp_path / "bf16" / name).items()}
    assert set(got) == set(want) and all(torch.equal(got[k], want[k].bfloat16()) for k in want)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16


def test_merge_refuses_what_it_cannot_merge(run, tmp_path):
    final = tmp_path / "final"
    shutil.copytree(run / "instruct" / "final", final)
    tensors = load_file(final / "adapter_model.safetensors")
    renamed = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}  # a layer the base lacks
    save_file(renamed, final / "adapter_model.safetensors")
    with pytest.raises(QloraMedError, match="no base weight for 7 trained tensors"):
        merge(final, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "file").write_text("x")
    with pytest.raises(QloraMedError, match="--overwrite"):
        merge(run, tmp_path / "occupied")
    info = json.loads((final / "stage.json").read_text())
    (final / "stage.json").write_text(json.dumps({**info, "quantization": "none"}))
    save_file(tensors, final / "adapter_model.safetensors")
    with pytest.raises(QloraMedError, match="not nf4"):
        merge(final, tmp_path / "out", MergeOptions(nf4_faithful=True))


@pytest.mark.parametrize(
    "template", ["mistral_instruct", "llava_med_v15", "vicuna_v1", "llava_med_v1", "plain"]
)
def test_chat_template_reproduces_render(processor, template):
    from qlora_med.prompts.chat_template import set_chat_template

    processor = copy.deepcopy(processor)  # the fixture is shared
    set_chat_template(processor, template, "<image>")
    conversations = [
        [("What is this?<image>", "A CT scan. "), ("Where is the lesion?", None)],
        [("<image>\n Describe the figure", "Lungs."), ("And the heart?", "Normal.")],
        [("Is there an effusion?", None)],
    ]
    for turns in conversations[:1] if template == "plain" else conversations:
        messages = []
        for i, (question, answer) in enumerate(turns):
            text = {"type": "text", "text": question.replace("<image>", "")}
            messages.append({"role": "user", "content": [{"type": "image"}, text] if i == 0 else [text]})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        got = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # an image part has no position in the text: render gets the question without a placeholder
        assert got == render(template, [(q.replace("<image>", ""), a) for q, a in turns], "<image>").text
