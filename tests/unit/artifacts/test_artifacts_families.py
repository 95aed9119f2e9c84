"""Merge, load, export and the model card for the families beyond LLaVA 1.5 (LLaVA-NeXT, Qwen2.5-VL, Gemma 3).

Each family's tiny model (qlora_med.model.tiny) gets a fake trained stage without the trainer: the kit's own
``load_model`` + ``setup_trainable`` (projector full, LLM LoRA), lora_B and the connector perturbed with random values,
saved with ``save_trainable`` plus the stage.json fields merge and load read. The merged folder, loaded by plain
transformers in a process that never imports qlora_med, gives the adapter model's logits (fp32, no quantization: the
merge is exact up to float rounding); GGUF and the LLaVA-Med layout are refused in one line. A LLaVA stage with the
projector keys of runs written before the family table (relative to ``model.multi_modal_projector.``) still merges.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qlora_med.artifacts.adapter import save_trainable
from qlora_med.artifacts.export import ExportOptions, export
from qlora_med.artifacts.merge import MergeOptions, merge
from qlora_med.artifacts.run_dir import FINAL, PROJECTOR_FILE, STAGE_JSON
from qlora_med.artifacts.shards import canonical_key
from qlora_med.config.families import CHAT_TEMPLATE, FAMILIES, hf_class_name
from qlora_med.errors import QloraMedError

ROOT = Path(__file__).resolve().parents[3]
IMAGE = ROOT / "data" / "sample" / "images" / "synpic42202.jpg"  # 203 x 256: padded to a square
NEW_FAMILIES = ("llava_next", "qwen2_5_vl", "gemma3")
# In a process that never imports qlora_med: the merged folder with the plain transformers class on the kit's inputs,
# then the model cards' code as written (merged, PEFT; each in its own namespace) where given.
PLAIN = """
import sys

import torch
import transformers

folder, class_name, inputs_file, out_file, *cards = sys.argv[1:]
model = getattr(transformers, class_name).from_pretrained(folder, dtype=torch.float32).eval()
with torch.no_grad():
    results = {"plain": {"logits": model(**torch.load(inputs_file)).logits}}
for kind, path in zip(("merged", "peft"), cards):
    namespace = {}
    exec(compile(open(path).read(), path, "exec"), namespace)
    with torch.no_grad():
        results[kind] = {**namespace["inputs"], "logits": namespace["model"](**namespace["inputs"]).logits}
torch.save(results, out_file)
assert "qlora_med" not in sys.modules, "imported qlora_med"
"""


def fake_stage(base: Path, out: Path, seed: int = 0) -> Path:
    """A stage ``final/`` as training writes it (adapter, projector, processor, stage.json), with random weights."""
    from qlora_med.config.schema import LoraConfig, ModelConfig
    from qlora_med.config.stages import TrainSpec
    from qlora_med.model.family import connector_parameters, family_of_config
    from qlora_med.model.load import load_model
    from qlora_med.train.trainable import setup_trainable

    model, processor = load_model(ModelConfig(name_or_path=str(base), quantization="none"), base, torch.float32)
    model = setup_trainable(model, TrainSpec(projector="full", llm="lora"), LoraConfig(r=4, alpha=8), None, False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        for param in connector_parameters(model, family_of_config(model.config)).values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    final = out / "instruct" / FINAL
    save_trainable(model, final)
    processor.save_pretrained(final)
    info = {"stage": "instruct", "kind": "instruct", "base_model": str(base), "previous_stage": None,
            "template": "mistral_instruct" if family_of_config(model.config).name == "llava" else CHAT_TEMPLATE,
            "quantization": "none", "compute_dtype": "float32", "image_aspect": "pad", "image_size": None,
            "train": {"projector": "full", "llm": "lora"}, "lora": {"r": 4, "alpha": 8}, "steps": 0}
    (final / STAGE_JSON).write_text(json.dumps(info))
    return final


def _kit_logits(path: Path) -> tuple[dict, torch.Tensor]:
    """The kit's inputs for one image question (training's render and image preprocessing) and the logits of
    the model ``load_trained`` serves for ``path``."""
    from qlora_med.eval.generate import Generator

    generator = Generator.load(path, "fp32")
    ids = generator.prompt_ids([("<image>\nWhat does this image show?", None)])
    inputs = generator._inputs([ids], generator.pixel_values([IMAGE], ["sample"]))
    with torch.no_grad():
        return inputs, generator.model(**inputs).logits


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by canonical (in-memory) name."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            out.update({canonical_key(k): handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    return out


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def stage(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(family, base dir, fake stage final/) for each new family, built once per module."""
    from qlora_med.config.schema import TinyModelConfig
    from qlora_med.model.tiny import build_tiny_model

    family = request.param
    root = tmp_path_factory.mktemp(f"artifacts-{family}")
    base = build_tiny_model(TinyModelConfig(family=family), root / "base")
    return family, base, fake_stage(base, root / "run")


def _card_code(folder: Path) -> str:
    blocks = re.findall(r"```python\n(.*?)\n```", (folder / "README.md").read_text(), re.S)
    assert len(blocks) == 1 and '"scan.png"' in blocks[0]
    return blocks[0].replace('"scan.png"', repr(str(IMAGE))).replace("max_new_tokens=128", "max_new_tokens=1")


def test_merged_model_and_card_code_reproduce_the_adapter_model(stage, tmp_path):
    """The merged folder in plain transformers (its family's class) gives the adapter model's logits; both cards'
    code, run as written, gives the kit's prompt ids and image inputs (padded to a square and resized as training
    did, by the code the card shows) and the same logits (PEFT: bit for bit)."""
    family, base, final = stage
    inputs, kit = _kit_logits(final)
    out = tmp_path / "merged"
    result = merge(final, out, MergeOptions(dtype="fp32"))
    assert result.merged_layers > 0 and result.delta_rel_norm > 0

    config = json.loads((out / "config.json").read_text())
    hf_class = FAMILIES[family].hf_class
    assert config["model_type"] in FAMILIES[family].model_types and config["architectures"] == [hf_class]
    meta = json.loads((out / "qlora_med.json").read_text())
    assert meta["family"] == family and meta["template"] == json.loads((final / STAGE_JSON).read_text())["template"]
    merged = _weights(out)  # the connector is the trained one, tensor for tensor, under the base's on-disk names
    for name, tensor in load_file(final / PROJECTOR_FILE).items():
        assert torch.equal(merged[name], tensor), name
    card = (out / "README.md").read_text()
    assert f"{hf_class}.from_pretrained" in card and "LlavaForConditionalGeneration" not in card
    assert "padded every image to a square" in card
    if FAMILIES[family].image_tokens != "fixed":
        side = meta["image_size"]
        assert side and f"square.resize(({side}, {side})" in card and f"{side}x{side} px" in card

    cards = []  # Qwen2-VL's AutoProcessor (the card's) needs torchvision
    if family != "qwen2_5_vl" or importlib.util.find_spec("torchvision") is not None:
        export(final, tmp_path / "peft", ExportOptions(format="peft"))
        (tmp_path / "scripts").mkdir()
        for kind in ("merged", "peft"):
            cards.append(tmp_path / "scripts" / f"card_{kind}.py")
            cards[-1].write_text(_card_code(tmp_path / kind))
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(out), hf_class, str(tmp_path / "inputs.pt"),
                           str(tmp_path / "plain.pt"), *map(str, cards)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp_path / "plain.pt")
    diff = (results["plain"]["logits"] - kit).abs().max().item()
    assert diff <= 1e-4, diff
    for kind in ("merged", "peft")[:len(cards)]:
        plain = results[kind]
        assert plain.keys() - {"logits"} == inputs.keys(), kind
        for key, value in inputs.items():
            assert torch.equal(plain[key], value), (kind, key)  # the kit's prompt and training pixels
        assert (plain["logits"] - kit).abs().max().item() <= 1e-4, kind
    if cards:
        assert torch.equal(results["peft"]["logits"], kit)

    # not vacuous: the untrained base computes other logits
    import transformers

    untrained = getattr(transformers, hf_class_name(config["model_type"])).from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        assert (untrained.eval()(**inputs).logits - kit).abs().max().item() > 100 * max(diff, 1e-6)


def test_on_disk_keys_map_to_the_in_memory_names(stage):
    """canonical_key: every tensor the base saved names one of the live model's (Qwen saves ``model.layers.*`` and
    ``visual.*``, LLaVA-NeXT ``image_newline``), so LoRA factors and connector tensors find their base weight."""
    import transformers

    family, base, _ = stage
    config = transformers.AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = getattr(transformers, hf_class_name(config.model_type))(config)
    names = set(model.state_dict())
    on_disk = set(_weights(base))
    assert on_disk <= names and names - on_disk <= {"lm_head.weight"}  # Gemma 3 ties lm_head: not saved
    for path in FAMILIES[family].connector:
        assert any(n == path or n.startswith(path + ".") for n in on_disk), path


def test_load_trained_of_the_merged_folder_and_export_hf(stage, tmp_path):
    """load_trained serves a merged folder with its family's class and processor (the kit's eval inputs and
    logits); export --format hf merges any family (and copies a merged folder); the PEFT card loads the connector by
    full module path."""
    family, _, final = stage
    hf = tmp_path / "hf"
    export(final, hf, ExportOptions(format="hf", dtype="fp32"))
    assert json.loads((hf / "config.json").read_text())["architectures"] == [FAMILIES[family].hf_class]
    assert (hf / "README.md").is_file() and json.loads((hf / "qlora_med.json").read_text())["family"] == family
    inputs, kit = _kit_logits(final)
    merged_inputs, merged_logits = _kit_logits(hf)
    assert type(merged_inputs) is type(inputs) and merged_inputs.keys() == inputs.keys()
    assert all(torch.equal(merged_inputs[k], inputs[k]) for k in inputs)
    assert (merged_logits - kit).abs().max().item() <= 1e-4
    copy = tmp_path / "hf-copy"  # a merged folder exports as itself
    export(hf, copy, ExportOptions(format="hf"))
    assert _weights(copy).keys() == _weights(hf).keys()

    peft = tmp_path / "peft"
    export(final, peft, ExportOptions(format="peft"))
    code = _card_code(peft)
    assert f"{FAMILIES[family].hf_class}.from_pretrained(base" in code
    assert json.dumps(list(FAMILIES[family].connector)) in code and "inner.get_parameter(name)" in code
    assert set(load_file(peft / PROJECTOR_FILE)) == set(load_file(final / PROJECTOR_FILE))


@pytest.mark.parametrize("fmt", ["gguf", "llava-med"])
def test_gguf_and_llava_med_are_refused_in_one_line(stage, fmt, tmp_path, caplog):
    from qlora_med.cli import main

    family, _, final = stage
    out = tmp_path / fmt
    with pytest.raises(QloraMedError) as err:
        export(final, out, ExportOptions(format=fmt))
    message = str(err.value)
    assert "\n" not in message and family in message and "export --format hf" in message, message
    if fmt == "gguf":
        assert FAMILIES[family].gguf in message
    assert not out.exists() and not (tmp_path / f".{fmt}.merged").exists()  # refused before merging

    with caplog.at_level(logging.ERROR, logger="qlora_med"):
        rc = main(["export", str(final), "--format", fmt, "--out", str(out)])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 1 and len(errors) == 1 and errors[0].getMessage() == message


def test_llava_stage_with_legacy_projector_keys_merges_and_loads(tiny_dir, tmp_path):
    """LLaVA runs written before the family table keyed projector.safetensors inside the projector."""
    from qlora_med.artifacts.load import load_trained

    final = fake_stage(tiny_dir, tmp_path / "run")
    full = load_file(final / PROJECTOR_FILE)
    assert all(k.startswith("model.multi_modal_projector.") for k in full)
    current = tmp_path / "current"
    merge(final, current, MergeOptions(dtype="fp32"))
    save_file({k.removeprefix("model.multi_modal_projector."): v for k, v in full.items()}, final / PROJECTOR_FILE)
    legacy = tmp_path / "legacy"
    merge(final, legacy, MergeOptions(dtype="fp32"))
    ours, theirs = _weights(current), _weights(legacy)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    model, _, _ = load_trained(final, "fp32")
    inner = model.base_model.model
    assert all(torch.equal(inner.get_parameter(k), v) for k, v in full.items())
    peft = tmp_path / "peft"
    export(final, peft, ExportOptions(format="peft"))
    assert set(load_file(peft / PROJECTOR_FILE)) == set(full)  # the export writes full paths: the card loads them
