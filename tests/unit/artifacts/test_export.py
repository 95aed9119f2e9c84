"""``qlora-med export``: PEFT adapter parity, LLaVA-Med layout round trip, GGUF files read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.trained_run import trained_run
from safetensors.torch import load_file

from qlora_med import cli
from qlora_med.artifacts.export import ExportOptions, export
from qlora_med.artifacts.merge import MergeOptions, merge
from qlora_med.artifacts.shards import canonical_key

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir) -> Path:
    return trained_run(tmp_path_factory, tiny_dir)


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "merged"
    merge(run, out, MergeOptions(dtype="fp32"))
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_peft_export_loads_with_peft_and_matches_the_merge(run, merged, tiny_dir, tmp_path):
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "peft"
    export(run, out, ExportOptions(format="peft", base_model_id=str(tiny_dir)))
    assert {"adapter_model.safetensors", "adapter_config.json", "projector.safetensors", "README.md",
            "chat_template.jinja"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)
    readme = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained" in readme and "projector.safetensors" in readme and "library_name: peft" in readme

    # exactly what the README tells a user to do
    model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32), out)
    for name, tensor in load_file(out / "projector.safetensors").items():  # full module paths
        model.base_model.model.get_parameter(name).data = tensor.float()
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(ROOT / "data" / "sample" / "images" / "cell.png").convert("RGB")
    inputs = processor(images=image, text=prompt, add_special_tokens=False, return_tensors="pt")
    reference = LlavaForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (model.eval()(**inputs).logits - reference(**inputs).logits).abs().max().item()
    assert diff < 1e-4  # PEFT on the fp32 base == the original-base merge


def test_llava_med_layout_and_round_trip(merged, tmp_path, capsys):
    from transformers import CLIPVisionModel

    out, back = tmp_path / "llava-med", tmp_path / "hf"
    assert cli.main(["export", str(merged), "--format", "llava-med", "--out", str(out)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    hf = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "llava_mistral" and config["architectures"] == ["LlavaMistralForCausalLM"]
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_hidden_size"] == hf["vision_config"]["hidden_size"]
    assert config["mm_vision_select_layer"] == -2 and config["mm_vision_select_feature"] == "patch"
    assert config["image_aspect_ratio"] == "pad" and config["mm_use_im_patch_token"] is False
    assert config["mm_use_im_start_end"] is False and config["hidden_size"] == hf["text_config"]["hidden_size"]
    assert config["mm_vision_tower"] == str((out / "vision_tower").resolve())

    tensors = _weights(out)
    source = {canonical_key(k): v for k, v in _weights(merged).items()}
    assert all(k.startswith(("model.", "lm_head.")) for k in tensors)
    assert torch.equal(tensors["model.mm_projector.0.weight"], source["model.multi_modal_projector.linear_1.weight"])
    assert torch.equal(tensors["model.mm_projector.2.bias"], source["model.multi_modal_projector.linear_2.bias"])
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"],
                       source["model.language_model.layers.0.self_attn.q_proj.weight"])
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" in tensors
    assert "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight" in tensors
    tower = CLIPVisionModel.from_pretrained(out / "vision_tower")  # what LLaVA-Med loads by mm_vision_tower
    for name, value in tower.state_dict().items():
        assert torch.equal(value, source["model.vision_tower." + name.removeprefix("vision_model.")]), name

    export(out, back, ExportOptions(format="hf"))
    original, restored = _weights(merged), _weights(back)
    assert set(original) == set(restored)
    for key, value in original.items():
        assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key
    assert json.loads((back / "config.json").read_text()) == hf


def test_gguf_files_read_back(run, merged, tmp_path):
    gguf = pytest.importorskip("gguf")
    from qlora_med.artifacts.gguf import permute_rotary

    out = tmp_path / "gguf"
    files = export(run, out, ExportOptions(format="gguf", dtype="fp32"))
    assert {f.name for f in files} >= {"llm-f32.gguf", "mmproj-f32.gguf", "README.md"}
    hf = json.loads((merged / "config.json").read_text())
    text, vision = hf["text_config"], hf["vision_config"]
    source = {canonical_key(k): v for k, v in _weights(merged).items()}

    llm = gguf.GGUFReader(out / "llm-f32.gguf")
    meta = {k: f.contents() for k, f in llm.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == text["num_hidden_layers"]
    assert meta["llama.attention.head_count_kv"] == text["num_key_value_heads"]
    assert meta["llama.vocab_size"] == text["vocab_size"] == len(llm.fields["tokenizer.ggml.tokens"].data)
    assert llm.fields["tokenizer.ggml.bos_token_id"].contents() == 1 and "tokenizer.chat_template" in llm.fields
    assert "<__media__>" in llm.fields["tokenizer.chat_template"].contents()  # llama.cpp's image marker
    tensors = {t.name: t for t in llm.tensors}
    per_block = ["attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_gate", "ffn_up", "ffn_down", "ffn_norm"]
    assert set(tensors) == {"token_embd.weight", "output.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(text["num_hidden_layers"]) for n in per_block}
    embed = source["model.language_model.embed_tokens.weight"]
    assert list(tensors["token_embd.weight"].shape) == list(embed.shape[::-1])
    assert torch.equal(torch.from_numpy(tensors["token_embd.weight"].data.copy()), embed)
    k_proj = source["model.language_model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(torch.from_numpy(tensors["blk.1.attn_k.weight"].data.copy()),
                       permute_rotary(k_proj, text["num_key_value_heads"]))

    mmproj = gguf.GGUFReader(out / "mmproj-f32.gguf")
    meta = {k: f.contents() for k, f in mmproj.fields.items()}
    assert meta["general.architecture"] == "clip" and meta["clip.projector_type"] == "mlp"
    assert meta["clip.vision.block_count"] == vision["num_hidden_layers"]
    assert meta["clip.vision.feature_layer"] == [vision["num_hidden_layers"] - 1]  # HF vision_feature_layer -2
    assert meta["clip.vision.image_size"] == vision["image_size"] and meta["clip.use_gelu"] is False
    names = {t.name for t in mmproj.tensors}
    assert {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias", "v.class_embd", "v.patch_embd.weight",
            "v.position_embd.weight", "v.pre_ln.weight", "v.blk.1.attn_out.weight", "v.blk.0.ffn_up.weight"} <= names
    assert not any("post_ln" in n for n in names)  # LLaVA uses hidden states before the post-layernorm
    mm0 = next(t for t in mmproj.tensors if t.name == "mm.0.weight")
    assert torch.equal(torch.from_numpy(mm0.data.copy()), source["model.multi_modal_projector.linear_1.weight"])


def test_card_has_training_and_evaluation_tables(run, merged, tmp_path):
    from qlora_med.artifacts.card import CardOptions, build_card

    (merged / "eval").mkdir(exist_ok=True)
    vqa = {"data": "/data/vqa_rad/test.json", "overall": {"paper": {"recall": 61.5, "closed accuracy": 80.1},
                                                          "strict": {"open exact match": 12.0}}}
    (merged / "eval" / "vqa_rad.json").write_text(json.dumps(vqa))
    chat = tmp_path / "qa50.json"
    chat.write_text(json.dumps({"groups": {"overall": {"count": 50, "relative": 55.3}}}))
    card = build_card(run / "instruct" / "final", "merged", merged, repo="me/tiny-med",
                      options=CardOptions(base_models=["llava-hf/llava-1.5-7b-hf"], datasets=["me/pmc"],
                                          license="apache-2.0", eval_files=[chat]))
    meta = card.split("---")[1]
    for line in ("library_name: transformers", "license: apache-2.0", "pipeline_tag: image-text-to-text",
                 "- llava-hf/llava-1.5-7b-hf", "- me/pmc", "- medical"):
        assert line in meta
    assert "| test | recall (paper) | 61.5 |" in card and "| qa50 | relative score: overall | 55.3 |" in card
    assert "| instruct | instruct | mistral_instruct |" in card and "## Resolved recipe" in card
    assert "learning_rate" in card and "Not for clinical use" in card and "# tiny-med" in card


def test_rotary_permutation_interleaves_halves():
    from qlora_med.artifacts.gguf import permute_rotary

    rows = permute_rotary(torch.arange(8).reshape(8, 1), n_head=2).flatten().tolist()
    assert rows == [0, 2, 1, 3, 4, 6, 5, 7]  # per head: (j, j + d/2) pairs become adjacent (GGML NORM rope)


def test_card_license_other_has_name_and_link(run, merged):
    """The Hub wants license_name + license_link with `license: other`: LLaVA-Med's research terms by default."""
    from qlora_med.artifacts.card import RESEARCH_LICENSE_LINK, CardOptions, build_card

    meta = build_card(run / "instruct" / "final", "merged", merged).split("---")[1]
    assert "license: other" in meta and "license_name: microsoft-research-license" in meta
    assert f"license_link: {RESEARCH_LICENSE_LINK}" in meta
    own = CardOptions(license="other", license_name="my-terms", license_link="LICENSE.md")
    meta = build_card(run / "instruct" / "final", "merged", merged, options=own).split("---")[1]
    assert "license_name: my-terms" in meta and "license_link: LICENSE.md" in meta


def test_gguf_vocabulary_is_the_sentencepiece_model(merged, tmp_path):
    """Scores and types from tokenizer.model (llama.cpp's SPM merges by score), added tokens, padding rows."""
    import gguf
    from sentencepiece import SentencePieceProcessor
    from transformers import AutoTokenizer

    from qlora_med.artifacts.gguf_vocab import find_spm_model
    from qlora_med.prompts.templates import tokenizer_mode

    out = tmp_path / "gguf"
    export(merged, out, ExportOptions(format="gguf", dtype="fp16"))
    fields = gguf.GGUFReader(out / "llm-f16.gguf").fields
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type"))
    sp = SentencePieceProcessor(model_file=str(find_spm_model(merged)))
    n = sp.get_piece_size()
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert scores[:n] == pytest.approx([sp.get_score(i) for i in range(n)])
    assert len(set(scores[259:n])) > 30000  # real scores, not a constant
    tokenizer = AutoTokenizer.from_pretrained(merged)
    image, pad = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id
    kinds = gguf.TokenType
    assert types[0] == kinds.UNKNOWN and types[1] == types[2] == kinds.CONTROL and types[3] == kinds.BYTE
    assert types[sp.piece_to_id("\u2581radi")] == kinds.NORMAL and tokens[image] == "<image>"
    assert types[image] == types[pad] == kinds.CONTROL and tokens[pad] == "<pad>"
    assert set(types[len(tokenizer):]) == {kinds.UNUSED} and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    meta = {k: fields[f"tokenizer.ggml.{k}"].contents() for k in (
        "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token", "add_space_prefix")}
    # add_space_prefix: llama.cpp's dummy prefix before every text piece == the training tokenizer's legacy mode
    legacy = tokenizer_mode(json.loads((merged / "qlora_med.json").read_text())["template"]).legacy
    assert meta == {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0, "padding_token_id": pad,
                    "add_bos_token": True, "add_space_prefix": legacy}


def test_gguf_add_space_prefix_follows_the_hf_tokenizer(tmp_path):
    from qlora_med.artifacts.gguf_vocab import add_space_prefix

    spm = Path(__import__("mistral_common").__file__).parent / "data" / "tokenizer.model.v1"  # add_dummy_prefix on
    for spec, expected in [
        ({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}}, False),
        ({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never"}}, False),
        ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always"}]}}, True),
        ({"normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                             {"type": "Replace"}]}, "pre_tokenizer": None}, True),
        (None, True),  # no tokenizer.json: the SentencePiece model's add_dummy_prefix
    ]:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        if spec is not None:
            (folder / "tokenizer.json").write_text(json.dumps(spec))
        assert add_space_prefix(folder, spm) is expected, spec


def test_gguf_export_nf4_faithful_merges_onto_the_nf4_base(run, merged, tmp_path):
    from qlora_med.errors import QloraMedError

    out = tmp_path / "gguf-nf4"
    assert cli.main(["export", str(run), "--format", "gguf", "--out", str(out), "--dtype", "fp32",
                     "--nf4-faithful"]) == 0
    assert json.loads((out / "qlora_med.json").read_text())["merge"] == "nf4-faithful"
    assert "**NF4-round-tripped base**" in (out / "README.md").read_text()
    assert "--jinja" in (out / "README.md").read_text()
    plain = tmp_path / "gguf"
    export(run, plain, ExportOptions(format="gguf", dtype="fp32"))
    assert "**original full-precision base**" in (plain / "README.md").read_text()
    with pytest.raises(QloraMedError, match="already merged"):
        export(merged, tmp_path / "again", ExportOptions(format="gguf", nf4_faithful=True))


def test_gguf_export_needs_the_sentencepiece_model(merged, tmp_path):
    import shutil

    from qlora_med.artifacts.gguf_vocab import find_spm_model
    from qlora_med.errors import QloraMedError

    copy = tmp_path / "merged"
    shutil.copytree(merged, copy)
    assert find_spm_model(copy).parent != copy  # the merged dir has none: the base's, via qlora_med.json
    meta = json.loads((copy / "qlora_med.json").read_text())
    (copy / "qlora_med.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone")}))
    with pytest.raises(QloraMedError, match="tokenizer.model"):
        export(copy, tmp_path / "gguf", ExportOptions(format="gguf"))
