"""Importing LLaVA's original checkpoint layout (LLaVA-Med v1.5 / LLaVA 1.5) as an HF LLaVA folder.

The source checkpoint is written by hand in exactly the layout LLaVA's code saves (``llava_mistral`` config with
``mm_*`` keys, ``model.layers.*`` / ``model.mm_projector.{0,2}.*`` tensors in two safetensors shards, the real
Mistral tokenizer without ``<image>``, the CLIP tower in its own folder), and the converted model's logits are
compared with the same weights assembled by hand the way LLaVA runs them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qlora_med import cli
from qlora_med.errors import QloraMedError
from qlora_med.model import original
from qlora_med.model.original import convert_original, ensure_hf_layout, is_original_layout
from qlora_med.model.processor import mistral_tokenizer
from qlora_med.model.source import resolve_model

ROOT = Path(__file__).resolve().parents[3]
IMAGE = ROOT / "data" / "sample" / "images" / "synpic42202.jpg"  # 203 x 256 radiograph
QUESTION = "Is there evidence of a pneumothorax in this chest radiograph?"
TEXT = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
)
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def _local(name: str) -> Path:
    return resolve_model(name, key="mm_vision_tower")


def _tower(folder: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        projection_dim=32,
    )
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_mean=MEAN, image_std=STD
    ).save_pretrained(folder)
    return folder


def _llm(family: str):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    if family == "llama":
        text = {
            k: v for k, v in TEXT.items() if k != "rope_theta"
        }  # LLaVA 1.5 (transformers 4.31) has none: 1e4
        return LlamaForCausalLM(LlamaConfig(**text, tie_word_embeddings=False))
    return MistralForCausalLM(MistralConfig(**TEXT, sliding_window=None, tie_word_embeddings=False))


def _original(folder: Path, tower: Path, projector: str = "mlp2x_gelu", family: str = "mistral") -> Path:
    """An original-layout LLaVA-Med v1.5 checkpoint (tiny), as LLaVA's save_pretrained writes it; ``family="llama"``:
    LLaVA 1.5's (``model_type: llava``, ``LlavaLlamaForCausalLM``)."""

    folder.mkdir(parents=True)
    tokenizer = mistral_tokenizer(folder)
    if family == "llama":
        tokenizer.pad_token = "<unk>"  # as liuhaotian/llava-v1.5-7b's tokenizer_config.json
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.json").unlink(
        missing_ok=True
    )  # LLaVA-Med v1.5 ships tokenizer.model + tokenizer_config.json
    assert "<image>" not in tokenizer.get_vocab() and len(tokenizer) == 32000
    torch.manual_seed(2)
    llm = _llm(family)
    torch.nn.init.normal_(llm.lm_head.weight, std=0.5)
    tensors = {k: v.contiguous() for k, v in llm.state_dict().items()}
    if projector == "mlp2x_gelu":
        tensors |= {
            "model.mm_projector.0.weight": torch.randn(64, 32) * 0.3,
            "model.mm_projector.0.bias": torch.randn(64),
            "model.mm_projector.2.weight": torch.randn(64, 64) * 0.3,
            "model.mm_projector.2.bias": torch.randn(64),
        }
    else:
        tensors |= {
            "model.mm_projector.weight": torch.randn(64, 32) * 0.3,
            "model.mm_projector.bias": torch.randn(64),
        }
    keys = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, names in shards.items():
        save_file({k: tensors[k] for k in names}, folder / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
        "architectures": ["LlavaMistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "feature_outs": "encoder+decoder",
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "image_aspect_ratio": "pad",
        "img_size": 640,
        "initializer_range": 0.02,
        "mm_hidden_size": 32,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": projector,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": str(tower),
        "model_type": "llava_mistral",
        "sliding_window": None,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right",
        "torch_dtype": "float32",
        "transformers_version": "4.36.2",
        "tune_mm_mlp_adapter": False,
        "use_cache": False,
        "use_mm_proj": True,
        "vision_tower_pretrained": None,
        **TEXT,
    }
    if family == "llama":
        config |= {
            "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava",
            "pretraining_tp": 1,
            "rope_scaling": None,
            "pad_token_id": 0,
        }
        del config["sliding_window"], config["rope_theta"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> Path:
    return _tower(tmp_path_factory.mktemp("clip") / "clip-vit-tiny")


@pytest.fixture(scope="module")
def source(tmp_path_factory, tower) -> Path:
    return _original(tmp_path_factory.mktemp("original") / "llava-med-tiny", tower)


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    return convert_original(source, tmp_path_factory.mktemp("converted") / "hf", _local)


def _pad(image):
    """LLaVA's expand2square with the image processor's mean colour (image_aspect_ratio: pad)."""
    from PIL import Image

    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in MEAN))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _hand_assembled_logits(
    source: Path, tower: Path, input_ids, image_token_id: int, pixel_values, family: str = "mistral"
):
    """LLaVA's forward written out: CLIP layer -2 without CLS -> mm_projector -> spliced into the LLM."""
    from transformers import CLIPVisionModel

    weights = {k: v for f in sorted(source.glob("*.safetensors")) for k, v in load_file(f).items()}
    vision = CLIPVisionModel.from_pretrained(tower).eval()
    llm = _llm(family).eval()
    llm.load_state_dict(
        {k: v for k, v in weights.items() if not k.startswith("model.mm_projector.")}, strict=True
    )
    with torch.no_grad():
        patches = vision(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        hidden = F.gelu(
            F.linear(patches, weights["model.mm_projector.0.weight"], weights["model.mm_projector.0.bias"])
        )
        features = F.linear(
            hidden, weights["model.mm_projector.2.weight"], weights["model.mm_projector.2.bias"]
        )
        is_image = input_ids == image_token_id
        assert int(is_image.sum()) == features.shape[1] == 16  # (56 / 14)^2 patches
        assert int(input_ids[~is_image].max()) < 32000  # every text token is in the original vocab
        embeds = weights["model.embed_tokens.weight"][input_ids.clamp(max=31999)]
        embeds[is_image] = features.reshape(-1, features.shape[-1])
        return llm(inputs_embeds=embeds).logits


def test_detects_the_original_layout(source, converted, tiny_dir):
    assert is_original_layout(json.loads((source / "config.json").read_text()))
    assert is_original_layout(
        {
            "model_type": "llava",
            "architectures": ["LlavaLlamaForCausalLM"],
            "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        }
    )  # liuhaotian/llava-v1.5-7b
    assert not is_original_layout(json.loads((converted / "config.json").read_text()))
    assert not is_original_layout(json.loads((tiny_dir / "config.json").read_text()))
    assert not is_original_layout({"model_type": "mistral", "architectures": ["MistralForCausalLM"]})


def test_converted_model_matches_the_hand_assembled_llava(source, tower, converted, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = LlavaForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(converted)
    config = model.config
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.projector_hidden_act == "gelu" and config.text_config.model_type == "mistral"
    assert config.text_config.rope_parameters["rope_theta"] == 1e6 and config.text_config.hidden_size == 64
    tokenizer = processor.tokenizer
    assert config.image_token_index == tokenizer.convert_tokens_to_ids("<image>") == 32000
    assert (
        tokenizer.pad_token == "<pad>" and config.text_config.vocab_size == 32064
    )  # grown to a multiple of 64
    assert list(processor.image_processor.image_mean) == MEAN  # the tower's own image processor
    meta = json.loads((converted / "qlora_med.json").read_text())
    assert meta["template"] == "llava_med_v15" and meta["image_aspect"] == "pad"

    image = _pad(Image.open(IMAGE).convert("RGB"))
    prompt = f"[INST] <image>\n{QUESTION} [/INST]"
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    pixels = CLIPImageProcessorPil.from_pretrained(tower)(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(inputs["pixel_values"], pixels)
    with torch.no_grad():
        ours = model(**inputs).logits
    reference = _hand_assembled_logits(source, tower, inputs["input_ids"], config.image_token_index, pixels)
    diff = (ours[..., :32000] - reference).abs().max().item()
    print(
        f"max |logit diff| converted vs hand-assembled: {diff:.3g} (logit scale {reference.abs().max():.3g})"
    )
    assert diff < 1e-5
    original_tokenizer_ids = mistral_tokenizer(tmp_path)(QUESTION)["input_ids"]
    assert tokenizer(QUESTION)["input_ids"] == original_tokenizer_ids  # same text tokens as LLaVA's tokenizer

    head = model.lm_head.weight.detach()  # the 64 added rows are the mean row, not random
    assert torch.allclose(head[32000:], head[:32000].mean(0).expand(64, -1), atol=1e-6)


def test_llava_1_5_llama_checkpoint(tmp_path, tower):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    src = _original(tmp_path / "llava-v1.5", tower, family="llama")
    out = convert_original(src, tmp_path / "hf", _local)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.text_config.model_type == "llama" and model.config.text_config.pad_token_id == 0
    assert model.config.text_config.rope_parameters["rope_theta"] == 10000.0  # LlamaConfig's default
    assert (
        processor.tokenizer.pad_token == "<unk>" and len(processor.tokenizer) == 32001
    )  # only <image> added
    assert json.loads((out / "qlora_med.json").read_text())["template"] == "vicuna_v1"
    inputs = processor(
        images=_pad(Image.open(IMAGE).convert("RGB")),
        text=f"USER: <image>\n{QUESTION} ASSISTANT:",
        return_tensors="pt",
    )
    with torch.no_grad():
        ours = model(**inputs).logits
    reference = _hand_assembled_logits(
        src,
        tower,
        inputs["input_ids"],
        model.config.image_token_index,
        inputs["pixel_values"],
        family="llama",
    )
    assert (ours[..., :32000] - reference).abs().max().item() < 1e-5


def test_cls_patch_keeps_the_cls_feature(tmp_path, tower):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    src = _original(tmp_path / "cls", tower)
    config = json.loads((src / "config.json").read_text()) | {"mm_vision_select_feature": "cls_patch"}
    (src / "config.json").write_text(json.dumps(config))
    out = convert_original(src, tmp_path / "hf", _local)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.vision_feature_select_strategy == processor.vision_feature_select_strategy == "full"
    inputs = processor(
        images=Image.open(IMAGE).convert("RGB"),
        text=f"[INST] <image>\n{QUESTION} [/INST]",
        return_tensors="pt",
    )
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 17  # CLS + 16 patches
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_weights_are_renamed_not_changed(source, tower, converted):
    from transformers import CLIPVisionModel

    ours = {k: v for f in sorted(converted.glob("*.safetensors")) for k, v in load_file(f).items()}
    theirs = {k: v for f in sorted(source.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert torch.equal(ours["multi_modal_projector.linear_2.weight"], theirs["model.mm_projector.2.weight"])
    assert torch.equal(
        ours["language_model.model.layers.1.mlp.down_proj.weight"],
        theirs["model.layers.1.mlp.down_proj.weight"],
    )
    assert torch.equal(
        ours["language_model.model.embed_tokens.weight"][:32000], theirs["model.embed_tokens.weight"]
    )
    clip = CLIPVisionModel.from_pretrained(tower).state_dict()
    assert all(
        torch.equal(ours["vision_tower." + k.removeprefix("vision_model.")], v) for k, v in clip.items()
    )
    assert len(ours) == len(theirs) + len(clip)


def test_linear_projector_becomes_linear_1_plus_identity(tmp_path, tower):
    from transformers import LlavaForConditionalGeneration

    src = _original(tmp_path / "linear", tower, projector="linear")
    out = convert_original(src, tmp_path / "hf", _local)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    assert model.config.projector_hidden_act == "linear"
    weights = load_file(src / "model-00001-of-00002.safetensors") | load_file(
        src / "model-00002-of-00002.safetensors"
    )
    x = torch.randn(3, 32)
    with torch.no_grad():
        ours = model.model.multi_modal_projector(x)
    assert torch.equal(
        ours, F.linear(x, weights["model.mm_projector.weight"], weights["model.mm_projector.bias"])
    )


def test_vision_tower_copy_in_the_checkpoint_is_used(tmp_path, tower, caplog):
    from transformers import CLIPVisionModel

    src = _original(tmp_path / "with-tower", tower)
    copy = {
        "model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model."): v.clone()
        for k, v in CLIPVisionModel.from_pretrained(tower).state_dict().items()
    }
    copy["model.vision_tower.vision_tower.vision_model.post_layernorm.bias"] += (
        1.0  # a tower trained with the LLM
    )
    shard = src / "model-00002-of-00002.safetensors"
    save_file(load_file(shard) | copy, shard)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] |= dict.fromkeys(copy, shard.name)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = convert_original(src, tmp_path / "hf", _local)
    weights = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert torch.equal(
        weights["vision_tower.post_layernorm.bias"],
        copy["model.vision_tower.vision_tower.vision_model.post_layernorm.bias"],
    )
    assert (
        "1 vision tower tensor(s) in the checkpoint differ" in caplog.text
        and "post_layernorm.bias" in caplog.text
    )

    del copy[
        "model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight"
    ]  # an incomplete copy is refused
    tensors = {k: v for k, v in load_file(shard).items() if not k.endswith("pre_layrnorm.weight")}
    save_file(tensors, shard)
    with pytest.raises(
        QloraMedError,
        match=r"tower copy is incomplete: missing tensors model\.vision_tower\.vision_tower\.vision_model\.pre_layrnorm\.weight",
    ):
        convert_original(src, tmp_path / "hf2", _local)


def test_unknown_tensor_is_named_in_the_error(tmp_path, tower):
    src = _original(tmp_path / "extra", tower)
    shard = src / "model-00002-of-00002.safetensors"
    tensors = load_file(shard) | {"model.mm_resampler.query": torch.zeros(4, 4)}
    save_file(tensors, shard)
    with pytest.raises(QloraMedError, match=r"model\.mm_resampler\.query") as err:
        convert_original(src, tmp_path / "hf", _local)
    assert "would be lost" in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_missing_tower_names_mm_vision_tower_and_the_fix(tmp_path, source):
    src = tmp_path / "moved"
    src.mkdir()
    for f in source.iterdir():
        if f.is_file():
            (src / f.name).symlink_to(f)
    config = json.loads((source / "config.json").read_text()) | {
        "mm_vision_tower": "/nowhere/clip-vit-large-patch14-336"
    }
    (src / "config.json").unlink()
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(QloraMedError, match="mm_vision_tower") as err:
        convert_original(src, tmp_path / "hf", _local)
    message = str(err.value)
    assert "/nowhere/clip-vit-large-patch14-336" in message and "hf download" in message
    assert "local CLIP folder" in message and "\n" not in message
    assert not (tmp_path / "hf").exists()


def test_pickle_weights_need_allow_pickle(tmp_path, tower):
    from transformers import LlavaForConditionalGeneration

    src = _original(tmp_path / "bin", tower)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for name in dict.fromkeys(index["weight_map"].values()):
        torch.save(
            load_file(src / name),
            src / name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin"),
        )
        (src / name).unlink()
    index["weight_map"] = {
        k: v.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        for k, v in index["weight_map"].items()
    }
    (src / "model.safetensors.index.json").unlink()
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(QloraMedError, match="allow-pickle"):
        convert_original(src, tmp_path / "hf", _local)
    out = convert_original(src, tmp_path / "hf", _local, allow_pickle=True)
    assert LlavaForConditionalGeneration.from_pretrained(out).config.image_token_index == 32000


def test_ensure_hf_layout_converts_once(tmp_path, source, tiny_dir, monkeypatch):
    assert ensure_hf_layout(tiny_dir, tmp_path, _local) == tiny_dir  # an HF LLaVA folder is used as it is
    first = ensure_hf_layout(source, tmp_path, _local)
    assert first.parent == tmp_path / "imported" and (first / "model.safetensors.index.json").is_file()
    stamp = (first / "config.json").stat().st_mtime_ns

    def no_reconvert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(original, "convert_original", no_reconvert)
    assert ensure_hf_layout(source, tmp_path, _local) == first  # cache hit
    assert (first / "config.json").stat().st_mtime_ns == stamp


def test_interrupted_conversion_leaves_nothing(tmp_path, source, monkeypatch):
    calls = []
    real = original._write_part

    def interrupted(out, index, tensors):
        calls.append(index)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C after the first shard
        return real(out, index, tensors)

    monkeypatch.setattr(original, "_write_part", interrupted)
    out = tmp_path / "cache" / "hf"
    with pytest.raises(KeyboardInterrupt):
        convert_original(source, out, _local)
    assert calls == [0, 1]
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_import_command(source, tmp_path, capsys):
    out = tmp_path / "imported"
    assert cli.main(["import", str(source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and "Not for clinical use" in printed
    assert (out / "config.json").is_file()
    assert cli.main(["import", str(source), "--out", str(out)]) == 1  # exists: needs --overwrite
    assert cli.main(["import", str(tmp_path / "absent" / "x"), "--out", str(tmp_path / "y")]) == 1


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_dir) -> Path:
    """Our tiny trained run merged to one fp32 HF folder (the run is shared with the artifacts tests)."""
    from helpers.trained_run import trained_run

    from qlora_med.artifacts.merge import MergeOptions, merge

    out = tmp_path_factory.mktemp("merged") / "merged"
    merge(trained_run(tmp_path_factory, tiny_dir), out, MergeOptions(dtype="fp32"))
    return out


def test_llava_med_export_converts_back_bit_for_bit(merged, tmp_path):
    from transformers import AutoProcessor, LlavaConfig

    from qlora_med.artifacts.export import ExportOptions, export

    exported = tmp_path / "llava-med"
    export(merged, exported, ExportOptions(format="llava-med"))
    assert is_original_layout(json.loads((exported / "config.json").read_text()))
    back = convert_original(exported, tmp_path / "hf", _local)  # the generic path, not export's own way back

    ours = {k: v for f in sorted(back.glob("*.safetensors")) for k, v in load_file(f).items()}
    theirs = {k: v for f in sorted(merged.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    a, b = LlavaConfig.from_pretrained(back), LlavaConfig.from_pretrained(merged)
    for name in (
        "image_token_index",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "projector_hidden_act",
        "tie_word_embeddings",
    ):
        assert getattr(a, name) == getattr(b, name), name
    assert a.image_seq_length == 16  # (56 / 14)^2; the tiny build leaves LlavaConfig's 576 (read by nothing)
    assert a.vision_config.to_diff_dict() == b.vision_config.to_diff_dict()
    text_a, text_b = a.text_config.to_dict(), b.text_config.to_dict()
    assert {k: v for k, v in text_a.items() if text_b.get(k) != v} == {}
    pa, pb = AutoProcessor.from_pretrained(back), AutoProcessor.from_pretrained(merged)
    assert (
        pa.tokenizer.get_vocab() == pb.tokenizer.get_vocab()
        and pa.tokenizer.pad_token == pb.tokenizer.pad_token
    )
    assert pa.image_processor.to_dict() == pb.image_processor.to_dict()


def test_import_from_hub_ids(source, tower, converted, monkeypatch, tmp_path):
    """SRC and its mm_vision_tower as Hub ids (a local Hub stand-in): the same folder as a local import."""
    from helpers.hub_env import folder_files, serve_hub
    from helpers.hub_standin import HubModel

    files = folder_files(source)
    config = json.loads(files["config.json"]) | {"mm_vision_tower": "openai/clip-vit-tiny-336"}
    files["config.json"] = json.dumps(config).encode()
    with serve_hub(monkeypatch, tmp_path / "hf-cache") as hub:
        hub.state.models["microsoft/llava-med-tiny"] = HubModel(files)
        hub.state.models["openai/clip-vit-tiny-336"] = HubModel(folder_files(tower))
        out = tmp_path / "from-hub"
        assert cli.main(["import", "microsoft/llava-med-tiny", "--out", str(out)]) == 0
    ours = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    local = {k: v for f in sorted(converted.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert ours.keys() == local.keys() and all(torch.equal(ours[k], local[k]) for k in local)
    assert json.loads((out / "qlora_med.json").read_text())["vision_tower"] == "openai/clip-vit-tiny-336"


def test_a_tower_folder_with_missing_weights_is_refused(tmp_path, tower, source):
    broken = tmp_path / "clip-broken"
    shutil.copytree(tower, broken)
    weights = load_file(broken / "model.safetensors")
    del weights[next(k for k in weights if k.endswith("post_layernorm.bias"))]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QloraMedError, match=r"mm_vision_tower.*lacks weights post_layernorm\.bias"):
        convert_original(source, tmp_path / "hf", lambda name: broken)  # never a randomly initialised tower


def test_training_starts_from_an_original_layout_folder(source, tmp_path, caplog):
    """`model.name_or_path` pointing at LLaVA-Med v1.5's layout: converted once into the cache, then trained."""
    import logging

    from qlora_med import cli

    root = Path(__file__).resolve().parents[3]
    args = ["train", str(root / "recipes" / "demo_cpu.yaml"), "--stage", "align", f"model.name_or_path={source}",
            "model.tiny=null", f"model.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}",
            "stages.align.max_steps=2", "stages.align.logging_steps=1",
            f"stages.align.data.path={root / 'data/sample/alignment.json'}",
            f"stages.align.data.image_folder={root / 'data/sample/images'}"]
    with caplog.at_level(logging.INFO):
        assert cli.main(args) == 0
    assert "is in LLaVA's original layout: converting it once" in caplog.text
    info = json.loads((tmp_path / "run" / "align" / "final" / "stage.json").read_text())
    assert info["base_model"].startswith(str(tmp_path / "cache" / "imported")) and info["steps"] == 2


def test_eval_and_chat_load_the_original_layout_release_directly(source, tmp_path, monkeypatch):
    """`--model` naming an original-layout folder (as the released LLaVA-Med v1.5): converted once, loaded as HF
    LLaVA with the release's template, so eval vqa / chat / serve / merge start from it without a run."""
    from qlora_med.artifacts.load import load_trained

    monkeypatch.chdir(tmp_path)  # the default cache (.cache/qlora-med) goes here
    model, processor, info = load_trained(source, compute_dtype="fp32")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and not model.training
    assert info["template"] == "llava_med_v15" and "<image>" in processor.tokenizer.get_vocab()
    assert any((tmp_path / ".cache" / "qlora-med" / "imported").iterdir())
