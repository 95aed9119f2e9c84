"""``eval vqa`` options: ``--decoding`` presets, ``--closed-suffix``, and refusing to resume a file of other settings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from qlora_med.cli import main as cli
from qlora_med.commands.eval_vqa import DECODING_CHOICES
from qlora_med.errors import QloraMedError
from qlora_med.eval.generate import (
    DECODING_PRESETS,
    Generator,
    Question,
    Sampling,
    answer_settings,
    ask,
    check_resumable,
    closed_suffix_text,
    decoding_sampling,
    load_questions,
    run_vqa,
)

ROOT = Path(__file__).resolve().parents[3]
IMAGES = ROOT / "data" / "sample" / "images"
TEST = ROOT / "data" / "sample" / "vqa_test.json"  # record 2006 (the 7th) is the first CLOSED one


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir) -> Path:
    from helpers.trained_run import trained_run

    return trained_run(tmp_path_factory, tiny_dir)


@pytest.fixture(scope="module")
def generator(run_dir) -> Generator:
    return Generator.load(run_dir)


def test_llava_med_preset_is_model_vqa_py_defaults(generator):
    """microsoft/LLaVA-Med llava/eval/model_vqa.py: temperature 0.2, top_p None, num_beams 1, max_new_tokens 1024,
    top_k not passed (transformers' 50)."""
    assert set(DECODING_CHOICES) == set(DECODING_PRESETS)
    name, sampling = decoding_sampling("llava-med")
    assert name == "llava-med" and sampling == Sampling(max_new_tokens=1024, temperature=0.2, top_p=1.0, top_k=50)
    kwargs = generator._generate_kwargs(sampling)
    assert kwargs["do_sample"] is True and (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (0.2, 1.0, 50)
    assert decoding_sampling("llava-med", max_new_tokens=16)[1].max_new_tokens == 16
    assert decoding_sampling("greedy") == ("greedy", Sampling(64))
    assert decoding_sampling(None) == ("greedy", Sampling(64))
    assert decoding_sampling(None, 8, 0.7, 0.9) == ("sampling", Sampling(8, 0.7, 0.9))
    with pytest.raises(ValueError, match="drop --temperature"):
        decoding_sampling("llava-med", temperature=0.5)
    assert generator._generate_kwargs(Sampling(8))["top_k"] is None  # greedy: sampling fields neutralised


def test_closed_suffix_goes_to_closed_questions_only():
    closed = Question("1", IMAGES / "cell.png", "is this a ct scan?\n<image>", {"answer_type": "CLOSED"})
    closed_front = Question("2", IMAGES / "cell.png", "<image>\nIs the lesion left? ", {"answer_type": "closed"})
    open_ = Question("3", IMAGES / "cell.png", "what organ is shown?\n<image>", {"answer_type": "OPEN"})
    suffix = closed_suffix_text("yes-no")
    assert suffix == "Please answer yes or no." and closed_suffix_text("  Answer briefly. ") == "Answer briefly."
    assert closed_suffix_text(None) is None and closed_suffix_text(" ") is None
    assert ask(closed, suffix) == "is this a ct scan? Please answer yes or no.\n<image>"  # placeholder stays last
    assert ask(closed_front, suffix) == "<image>\nIs the lesion left? Please answer yes or no."
    assert ask(open_, suffix) == open_.text and ask(closed, None) == closed.text


def test_vqa_answers_record_decoding_and_suffix(generator, tmp_path, caplog):
    questions = load_questions(TEST, IMAGES)[5:8]  # OPEN, CLOSED, OPEN
    assert [q.metadata["answer_type"] for q in questions] == ["OPEN", "CLOSED", "OPEN"]
    out, suffix = tmp_path / "pred.jsonl", "Please answer yes or no."
    _, sampling = decoding_sampling("llava-med", max_new_tokens=3)
    assert run_vqa(generator, questions, out, "m", sampling, 2, False, suffix, "llava-med") == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [ask(q, suffix) for q in questions]
    assert suffix in rows[1]["prompt"] and suffix not in rows[0]["prompt"] + rows[2]["prompt"]
    meta = rows[1]["metadata"]
    assert {k: meta[k] for k in ("decoding", "temperature", "top_p", "top_k", "max_new_tokens", "closed_suffix")} == {
        "decoding": "llava-med", "temperature": 0.2, "top_p": 1.0, "top_k": 50, "max_new_tokens": 3,
        "closed_suffix": suffix}
    assert meta["model"] == generator.source and meta["template"] == "mistral_instruct"
    assert meta["answer_type"] == "CLOSED"

    with pytest.raises(QloraMedError, match=r"closed_suffix: 'Please answer yes or no\.' there, None now"):
        run_vqa(generator, questions, out, "m", sampling, 2, False, None, "llava-med")
    caplog.set_level(logging.WARNING)
    run_vqa(generator, questions[:1], tmp_path / "open.jsonl", "m", Sampling(2), 1, False, suffix)
    assert "no question has answer_type CLOSED" in caplog.text


def test_resume_is_refused_for_another_model_or_other_settings(tmp_path):
    out = tmp_path / "pred.jsonl"
    greedy = answer_settings("/runs/a/final", Sampling(8), "greedy", None, "mistral_instruct")
    out.write_text(json.dumps({"question_id": 1, "text": "x", "model_id": "a",
                               "metadata": {"answer_type": "OPEN", **greedy}}) + "\n")
    check_resumable(out, "a", greedy)  # the same: resumes
    check_resumable(out, "a", {k: v for k, v in greedy.items() if k != "template"})  # before the model loads
    check_resumable(out, "a", {**greedy, "decoding": "sampling"})  # a label; the values decide
    check_resumable(tmp_path / "missing.jsonl", "b", greedy)
    for model_id, settings, key in [
        ("b", greedy, "model_id"),
        ("a", {**greedy, "model": "/runs/b/final"}, "model"),
        ("a", {**greedy, "template": "llava_med_v15"}, "template"),
        ("a", answer_settings("/runs/a/final", Sampling(16), "greedy", None, "mistral_instruct"), "max_new_tokens"),
        ("a", answer_settings("/runs/a/final", DECODING_PRESETS["llava-med"], "llava-med"), "temperature"),
        ("a", {**greedy, "closed_suffix": "Please answer yes or no."}, "closed_suffix"),
    ]:
        with pytest.raises(QloraMedError, match=rf"\({key}: .* there, .* now\); pass a new --out, or delete") as err:
            check_resumable(out, model_id, settings)
        assert "\n" not in str(err.value)

    # a file from before the settings were recorded (template, temperature, max_new_tokens only)
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text(json.dumps({"question_id": 1, "text": "x", "model_id": "a", "metadata": {
        "template": "mistral_instruct", "temperature": 0.0, "max_new_tokens": 8, "image": "a.png"}}) + "\n")
    check_resumable(legacy, "a", greedy)  # greedy then and now; the model folder was not recorded
    with pytest.raises(QloraMedError, match="closed_suffix: None there"):
        check_resumable(legacy, "a", {**greedy, "closed_suffix": "Please answer yes or no."})


def test_eval_vqa_cli_refuses_before_loading_the_model(run_dir, tmp_path, caplog):
    out = tmp_path / "pred.jsonl"
    args = ["eval", "vqa", "--model", str(run_dir), "--data", str(TEST), "--image-folder", str(IMAGES),
            "--out", str(out), "--limit", "7", "--batch-size", "7", "--no-progress"]
    assert cli([*args, "--decoding", "greedy", "--max-new-tokens", "2", "--closed-suffix", "yes-no"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[6]["prompt"].endswith("Please answer yes or no.\n<image>") and rows[6]["metadata"]["decoding"] == "greedy"
    before = out.read_text()
    caplog.set_level(logging.INFO)
    assert cli([*args, "--max-new-tokens", "2", "--closed-suffix", "Please answer yes or no."]) == 0  # the same
    assert "7 of 7 question(s) already answered" in caplog.text
    caplog.clear()
    assert cli([*args, "--decoding", "llava-med", "--max-new-tokens", "2", "--closed-suffix", "yes-no"]) == 1
    assert "pass a new --out, or delete" in caplog.text and "loaded trained model" not in caplog.text
    assert cli([*args, "--decoding", "llava-med", "--temperature", "0.5"]) == 1
    assert "drop --temperature" in caplog.text
    assert out.read_text() == before


def test_question_images_must_stay_inside_the_image_folder(tmp_path):
    """An eval file whose image path leads out of --image-folder is refused by record, unless allowed."""
    import json

    import pytest

    from qlora_med.errors import DataError
    from qlora_med.eval.generate import load_questions

    (tmp_path / "images").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"id": 1, "image": "../secret.png", "answer_type": "CLOSED",
                                 "conversations": [{"from": "human", "value": "<image>\nIs it normal?"},
                                                   {"from": "gpt", "value": "yes"}]}]))
    with pytest.raises(DataError, match=r"test.json record #1: .*outside.*--allow-outside-images"):
        load_questions(test, tmp_path / "images")
    assert load_questions(test, tmp_path / "images", allow_outside_images=True)[0].image.name == "secret.png"
