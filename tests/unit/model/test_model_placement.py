"""QLoRA placement and what each stage trains, asserted on the tiny model (NF4 on CPU)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers.legacy import trainable_parameter_names

from qlora_med.config.loader import load_recipe
from qlora_med.config.schema import LoraConfig, ModelConfig
from qlora_med.config.stages import TrainSpec
from qlora_med.model.build import compose
from qlora_med.model.load import load_model
from qlora_med.train.trainable import setup_trainable

PROJECTOR = re.compile(r"(^|\.)model\.multi_modal_projector\.linear_[12]\.(weight|bias)$")
LORA = re.compile(r"\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.lora_[AB]\.default\.weight$")


def _load(tiny_dir, quantization="nf4"):
    cfg = ModelConfig(name_or_path=str(tiny_dir), quantization=quantization)
    return load_model(cfg, tiny_dir, torch.float32)


def test_nf4_goes_on_llm_linears_only(tiny_dir):
    import bitsandbytes as bnb

    model, _ = _load(tiny_dir)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, module in linears.items():
        in_llm = ".language_model.layers." in name
        assert isinstance(module, bnb.nn.Linear4bit) == in_llm, name
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in linears.values()) == 2 * 7
    quant_state = model.model.language_model.layers[0].self_attn.q_proj.weight.quant_state
    assert quant_state.quant_type == "nf4" and quant_state.nested  # double quantization
    for part in (model.model.vision_tower, model.model.multi_modal_projector, model.lm_head):
        assert all(p.dtype == torch.float32 for p in part.parameters())


def test_quantization_none_keeps_plain_linears(tiny_dir):
    model, _ = _load(tiny_dir, "none")
    assert type(model.model.language_model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_projector_only_stage_trains_exactly_the_projector(tiny_dir):
    model, _ = _load(tiny_dir)
    model = setup_trainable(model, TrainSpec("full", "frozen"), LoraConfig(), None, True)
    names = trainable_parameter_names(model)
    assert len(names) == 4 and all(PROJECTOR.search(n) for n in names)


def test_lora_stage_trains_adapters_on_every_llm_linear_and_the_projector(tiny_dir):
    model, _ = _load(tiny_dir)
    model = setup_trainable(model, TrainSpec("full", "lora"), LoraConfig(r=4), None, True)
    names = trainable_parameter_names(model)
    lora = [n for n in names if LORA.search(n)]
    assert len(lora) == 2 * 7 * 2  # layers x linears x (A, B)
    assert sorted(set(names) - set(lora)) == sorted(n for n in names if PROJECTOR.search(n))
    assert len(names) == len(lora) + 4
    assert not any("vision_tower" in n or "lm_head" in n for n in names)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_lora_target_subset(tiny_dir):
    model, _ = _load(tiny_dir)
    model = setup_trainable(model, TrainSpec("frozen", "lora"), LoraConfig(target_modules=["q_proj", "v_proj"]),
                            None, False)
    names = trainable_parameter_names(model)
    assert len(names) == 2 * 2 * 2 and all(re.search(r"\.(q|v)_proj\.lora_", n) for n in names)


def test_training_changes_only_what_the_stage_declares(tiny_dir, tmp_path, monkeypatch):
    """A few real trainer steps: LoRA and projector move; every frozen tensor is bit-identical."""
    from qlora_med.train.runner import train_stage

    monkeypatch.chdir(tmp_path.parent)
    root = __import__("pathlib").Path(__file__).resolve().parents[3]
    recipe = load_recipe(root / "recipes" / "demo_cpu.yaml", [
        f"model.name_or_path={tiny_dir}", f"output_dir={tmp_path / 'run'}",
        f"stages.align.data.path={root / 'data/sample/alignment.json'}",
        f"stages.align.data.image_folder={root / 'data/sample/images'}",
        "stages.align.max_steps=3", "stages.align.save_steps=100", "stages.align.logging_steps=1",
    ])
    captured = {}
    import qlora_med.train.runner as runner

    real = runner.setup_trainable

    def spy(model, *args, **kwargs):
        model = real(model, *args, **kwargs)
        captured["model"] = model
        captured["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        captured["buffers"] = {n: b.detach().clone() for n, b in model.named_buffers()}
        return model

    monkeypatch.setattr(runner, "setup_trainable", spy)
    info = train_stage(recipe, recipe.stage("align"))
    model, before = captured["model"], captured["before"]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = set(trainable_parameter_names(model))
    assert changed == trainable
    assert all(p.dtype == torch.float32 for p in model.base_model.model.model.multi_modal_projector.parameters())
    for name, buf in model.named_buffers():
        assert torch.equal(buf, captured["buffers"][name]), name
    assert info["steps"] == 3 and info["loss_last"] < info["loss_first"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny CLIP vision dir and a tiny Mistral dir, as a user would have downloaded them."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

    from qlora_med.model.processor import mistral_tokenizer

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=56, patch_size=14)).save_pretrained(root / "clip")
    llm = MistralForCausalLM(MistralConfig(vocab_size=32000, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    llm.save_pretrained(root / "llm")
    mistral_tokenizer(root / "llm").save_pretrained(root / "llm")
    return root


@pytest.mark.parametrize("projector_type", ["mlp2x_gelu", "linear"])
def test_compose_clip_and_llm_with_a_fresh_projector(parts, tmp_path, projector_type):
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration, MistralForCausalLM

    cfg = ModelConfig(vision_tower=str(parts / "clip"), llm=str(parts / "llm"), projector_type=projector_type,
                      cache_dir=str(tmp_path))
    out = compose(cfg)
    assert compose(cfg) == out  # cached
    llava = LlavaForConditionalGeneration.from_pretrained(out)
    clip = CLIPVisionModel.from_pretrained(parts / "clip")
    llm = MistralForCausalLM.from_pretrained(parts / "llm")
    assert torch.equal(llava.model.vision_tower.encoder.layers[1].mlp.fc1.weight, clip.encoder.layers[1].mlp.fc1.weight)
    assert torch.equal(llava.model.language_model.layers[1].self_attn.q_proj.weight,
                       llm.model.layers[1].self_attn.q_proj.weight)
    assert llava.config.vision_feature_layer == -2
    assert llava.model.language_model.embed_tokens.weight.shape[0] >= 32002  # <image> and <pad> added
    eye = torch.equal(llava.model.multi_modal_projector.linear_2.weight, torch.eye(64))
    assert eye == (projector_type == "linear")
    model, processor = load_model(cfg, out, torch.float32)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == llava.config.image_token_id
