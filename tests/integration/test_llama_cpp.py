"""The GGUF export run by a real llama.cpp (pinned, built by ``make llama-cpp``) against transformers.

* tokenization: ``llama-tokenize`` gives the HF tokenizer's ids on biomedical sentences, after BOS,
  with a leading space and inside the training template (``<image>``, ``</s>``, second turn);
* text: ``llama-debug --save-logits`` gives transformers' last-position logits, ``llama-simple``
  (greedy) transformers' greedy tokens;
* image: ``llama-mtmd-cli --jinja`` runs an image + question through the mmproj and generates
  transformers' greedy tokens.

The model is the tiny one of the export tests, merged onto the NF4-round-tripped base (what the run
evaluated) in fp32, so both sides compute in fp32 and agree to float rounding. Skipped, naming the build
command, where the tools are not built (CI builds them first, see .ci/run).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import llama_cpp_build
from helpers.trained_run import trained_run

from qlora_med.artifacts.export import ExportOptions, export
from qlora_med.artifacts.merge import MergeOptions, merge
from qlora_med.prompts.templates import render

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    not llama_cpp_build.ready(),
    reason=f"llama.cpp {llama_cpp_build.VERSION} tools not built in {llama_cpp_build.CACHE} "
    f"(run `{llama_cpp_build.BUILD_COMMAND}`)",
)

SENTENCES = [
    "Chest radiograph shows a right lower lobe consolidation.",
    "Contrast-enhanced CT of the abdomen demonstrates a hypodense hepatic lesion.",
    "MRI reveals T2-hyperintense periventricular white matter lesions.",
    "Fluorodeoxyglucose PET/CT shows hypermetabolic mediastinal lymphadenopathy.",
    "Ultrasound: 12 mm gallstone with posterior acoustic shadowing.",
    "H&E stain, 40x: nests of atypical squamous cells with keratin pearls.",
    "Immunohistochemistry is positive for CD20 and negative for CD3.",
    "Ki-67 proliferation index ~80%; diffuse p53 overexpression.",
    "Histopathology shows non-caseating granulomas (sarcoidosis).",
    "Dermoscopy: asymmetric pigmented lesion with an atypical pigment network.",
    "Erythematous plaques with silvery scale on the extensor surfaces.",
    "Is there a pneumothorax?",
    "What modality was used to take this image?",
    "eGFR ≥ 60 mL/min/1.73 m², β-hCG négatif, 5 µm sections.",
    "Findings:\n  1. Cardiomegaly.\n  2. No pleural effusion.",
]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "2"}


def _tool(
    name: str, *args: str, stdin: bytes | None = None, timeout: int = 60
) -> subprocess.CompletedProcess:
    cmd = [str(llama_cpp_build.binary(name)), *args]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout, env=_env())
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr.decode(errors='replace')[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_dir) -> Path:
    run = trained_run(tmp_path_factory, tiny_dir)
    out = tmp_path_factory.mktemp("llama-cpp") / "merged-nf4"
    merge(run, out, MergeOptions(dtype="fp32", nf4_faithful=True))
    return out


@pytest.fixture(scope="module")
def gguf_dir(merged) -> Path:
    out = merged.with_name("gguf")
    export(merged, out, ExportOptions(format="gguf", dtype="fp32"))
    return out


@pytest.fixture(scope="module")
def tokenizer(merged):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(merged)


@pytest.fixture(scope="module")
def model(merged):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()


def _llama_ids(gguf_dir: Path, text: str, bos: bool) -> list[int]:
    args = ["-m", str(gguf_dir / "llm-f32.gguf"), "--stdin", "--no-escape", "--ids", "--log-disable"]
    out = _tool("llama-tokenize", *args, *([] if bos else ["--no-bos"]), stdin=text.encode()).stdout.decode()
    return json.loads(out.strip().splitlines()[-1])


def _hf_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenization_matches_transformers(gguf_dir, tokenizer):
    """After BOS (as every template starts), with a leading space, and inside the training template."""
    cases = []
    for s in SENTENCES:
        cases += [
            ("after <s>", "<s>" + s),
            ("leading space", " " + s),
            ("template", render("mistral_instruct", [(s, "A cell."), ("Where?", None)], "<image>").text),
        ]
    failures = [
        (kind, text, _hf_ids(tokenizer, text), _llama_ids(gguf_dir, text, bos=False)) for kind, text in cases
    ]
    failures = [f for f in failures if f[2] != f[3]]
    assert not failures, f"{len(failures)}/{len(cases)} differ, e.g. {failures[0]}"
    for s in SENTENCES:  # BOS added by llama.cpp (add_bos_token) == BOS written in the text
        assert _llama_ids(gguf_dir, s, bos=True) == _hf_ids(tokenizer, "<s>" + s)
    # the words the issue saw split wrongly with constant scores
    pieces = tokenizer.convert_ids_to_tokens(
        _llama_ids(gguf_dir, "<s>Chest radiograph, Immunohistochemistry", bos=False)
    )
    assert pieces[-10:] == ["\u2581radi", "ograph", ",", "\u2581Im", "mun", "oh", "ist", "oc", "hem", "istry"]


def test_raw_text_at_the_input_start(gguf_dir, tokenizer):
    """Text with no BOS and no leading space: identical with a legacy (``Prepend``) tokenizer, the kit's; with a
    Metaspace-'first' one the documented difference (qlora_med.artifacts.gguf_vocab): HF ``▁Chest``, llama.cpp
    ``Ch est`` as after BOS. No template produces such text."""
    import gguf

    fields = gguf.GGUFReader(gguf_dir / "llm-f32.gguf").fields
    text = SENTENCES[0]
    llama = _llama_ids(gguf_dir, text, bos=False)
    if fields["tokenizer.ggml.add_space_prefix"].contents():
        assert llama == _hf_ids(tokenizer, text)
    else:
        assert llama == _hf_ids(tokenizer, "<s>" + text)[1:] and llama != _hf_ids(tokenizer, text)


# fp32 attention and KV cache: llama.cpp's CPU flash attention (on by default) rounds through f16 (max logit
# diff 3e-3 on this model instead of 2e-6)
EXACT = ("-fa", "off", "-ctk", "f32", "-ctv", "f32")
PROMPTS = ["What is shown?", "Is there a pneumothorax?", "Describe the histopathology of this lesion."]
N_NEW = 12
MARGIN = 1e-2  # > llama.cpp's logit error with f16 flash attention (2e-3 here)
# llama.cpp#25814 (fix: PR #25844, open): the pinned llama.cpp's llava graph appends [CLS] after the patches but
# still gives positions 0..n in order and keeps rows 1..n, so each patch gets its neighbour's position embedding,
# patch 0 is dropped and [CLS] becomes the last image token, for every CLIP (LLaVA-1.5-style) mmproj. The image
# test checks llama.cpp against transformers computing that layout, and that it differs from the true one;
# set False once a pinned llama.cpp has the fix.
LLAVA_CLS_LAST = True


@pytest.fixture(scope="module")
def pieces(gguf_dir) -> list[bytes]:
    """What llama.cpp prints for each token id (llama_token_to_piece, special=true), from the GGUF's own vocab."""
    import gguf

    fields = gguf.GGUFReader(gguf_dir / "llm-f32.gguf").fields
    texts, kinds = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    out = []
    for text, kind in zip(texts, kinds, strict=True):
        if kind == gguf.TokenType.NORMAL:
            out.append(text.replace("\u2581", " ").encode())
        elif kind == gguf.TokenType.BYTE:
            out.append(bytes([int(text[3:5], 16)]))
        else:  # CONTROL / UNKNOWN / USER_DEFINED: their text; UNUSED ([PAD] rows): nothing
            out.append(b"" if kind == gguf.TokenType.UNUSED else text.encode())
    return out


def _greedy(model, eos: int, **inputs) -> list[int]:
    """transformers' greedy tokens, cut at EOS (llama.cpp stops there without printing it) and before the first
    step whose top-2 logits are within MARGIN (there float rounding, f16 in llama-simple, may pick either)."""
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=N_NEW,
            do_sample=False,
            eos_token_id=None,
            output_scores=True,
            return_dict_in_generate=True,
        )
    start = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
    tokens = []
    for token, scores in zip(out.sequences[0, start:].tolist(), out.scores, strict=True):
        top = scores[0].topk(2).values
        if token == eos or top[0] - top[1] < MARGIN:
            break
        tokens.append(token)
    return tokens


def test_text_logits_and_greedy_tokens_match_transformers(gguf_dir, tokenizer, model, pieces, tmp_path):
    import numpy as np

    llm, compared = str(gguf_dir / "llm-f32.gguf"), 0
    for i, question in enumerate(PROMPTS):
        prompt = f"[INST] {question} [/INST]"
        ids = _hf_ids(tokenizer, "<s>" + prompt)
        folder = tmp_path / f"logits{i}"
        args = ["-p", prompt, "--no-escape", "--save-logits", "--logits-output-dir", str(folder)]
        _tool("llama-debug", "-m", llm, *args, "-t", "2", "-c", "256", "--no-warmup", *EXACT)
        assert np.fromfile(folder / "llamacpp-llm-f32-tokens.bin", dtype=np.int32).tolist() == ids
        theirs = torch.from_numpy(np.fromfile(folder / "llamacpp-llm-f32.bin", dtype=np.float32))
        with torch.no_grad():
            ours = model(input_ids=torch.tensor([ids])).logits[0, -1]
        diff = (theirs - ours).abs().max().item()
        assert diff < 1e-4 and theirs.argmax() == ours.argmax(), (question, diff)

        # greedy decoding (llama-simple: default context, so f16 flash attention; argmax is robust to it here)
        generated = _greedy(model, tokenizer.eos_token_id, input_ids=torch.tensor([ids]))
        out = _tool("llama-simple", "-m", llm, "-n", str(N_NEW), prompt).stdout
        expected = b"".join(pieces[t] for t in ids + generated)
        assert out.startswith(expected), (question, out, expected)
        compared += len(generated)
    assert compared >= N_NEW, f"only {compared} greedy tokens before near-ties: pick other prompts"


def _image_features(model, pixel_values: torch.Tensor, cls_last: bool) -> torch.Tensor:
    """LLaVA's image features (n_patches, hidden) computed step by step, [CLS] first (HF) or last (llama.cpp)."""
    tower, layer = model.model.vision_tower, model.config.vision_feature_layer
    emb = tower.embeddings
    patches = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    cls = emb.class_embedding.reshape(1, 1, -1)
    hidden = tower.pre_layrnorm(
        torch.cat([patches, cls] if cls_last else [cls, patches], 1) + emb.position_embedding.weight
    )
    for block in tower.encoder.layers[: len(tower.encoder.layers) + layer + 1]:  # up to hidden_states[layer]
        hidden = block(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return model.model.multi_modal_projector(hidden[0, 1:])


def test_image_question_through_the_mmproj(gguf_dir, merged, model, pieces, tmp_path):
    """Image embeddings of the mmproj, the chat template's prompt and greedy tokens, against transformers."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from qlora_med.artifacts.gguf_vocab import MTMD_MARKER

    processor = AutoProcessor.from_pretrained(merged)
    size = processor.image_processor.crop_size["height"]
    image = Image.open(ROOT / "data" / "sample" / "images" / "cell.png").convert("RGB").resize((size, size))
    path, dump = tmp_path / "cell.png", tmp_path / "embeddings.bin"
    image.save(path)  # already the tower's size: neither side resizes, both see the same pixels
    question = "What is shown?"
    args = ["--mmproj", str(gguf_dir / "mmproj-f32.gguf"), "--jinja", "--image", str(path), "-p", question]
    env = {**_env(), "MTMD_DEBUG_EMBEDDINGS": str(dump)}  # llama.cpp dumps the projected image embeddings
    cmd = [str(llama_cpp_build.binary("llama-mtmd-cli")), "-m", str(gguf_dir / "llm-f32.gguf"), *args]
    cmd += ["-n", str(N_NEW), "--temp", "0", "-t", "2", "-c", "512", "--no-warmup", "-v", *EXACT]
    proc = subprocess.run(cmd, capture_output=True, timeout=120, env=env)
    log = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, log[-4000:]

    # 1. the image embeddings
    n_tokens, n_embd = np.fromfile(dump, dtype=np.int32, count=2)
    theirs = torch.from_numpy(np.fromfile(dump, dtype=np.float32, offset=8).reshape(n_tokens, n_embd))
    pixel_values = processor.image_processor(Image.open(path).convert("RGB"), return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        true = _image_features(model, pixel_values, cls_last=False)
        hf = model.model.get_image_features(pixel_values=pixel_values).pooler_output
        assert torch.allclose(
            true, torch.as_tensor(hf[0]).reshape(true.shape), atol=1e-6
        )  # the hand-made path
        reference = _image_features(model, pixel_values, cls_last=LLAVA_CLS_LAST)
    assert (theirs - reference).abs().max().item() < 1e-4  # patch conv im2col goes through f16: ~2e-5
    if LLAVA_CLS_LAST:
        assert (theirs - true).abs().max().item() > 1e-2, "llama.cpp#25814 fixed: set LLAVA_CLS_LAST = False"

    # 2. the prompt llama.cpp rendered from the GGUF's chat template (it strips BOS and adds it as a token)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    rendered = re.search(r"formatted_chat\.prompt: (.*?)\n[0-9.]+ [A-Z] ", log, re.S).group(1)
    assert rendered == prompt.removeprefix("<s>").replace(processor.image_token, MTMD_MARKER)

    # 3. greedy tokens, transformers fed the same image embeddings
    inputs = processor(images=image, text=prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        embeds[inputs["input_ids"] == model.config.image_token_id] = reference
    generated = _greedy(
        model, processor.tokenizer.eos_token_id, inputs_embeds=embeds, attention_mask=inputs["attention_mask"]
    )
    expected = b"\n" + b"".join(pieces[t] for t in generated)  # mtmd-cli prints a newline after the prompt
    assert proc.stdout.startswith(expected), (proc.stdout, expected)
