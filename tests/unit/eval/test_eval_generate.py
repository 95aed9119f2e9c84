"""``qlora-med eval vqa``: prompts as training renders them, answer-file format, resume, batch invariance."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers.legacy import load_records

from qlora_med.cli import main as cli
from qlora_med.data.encoder import BatchEncoder, EncodeSpec
from qlora_med.eval.generate import Generator, Sampling, load_questions, read_done, run_vqa
from qlora_med.prompts.templates import IGNORE_INDEX
from qlora_med.prompts.templates import KIT_TEMPLATES as TEMPLATES

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "data" / "sample"
IMAGES = SAMPLE / "images"
TEST = SAMPLE / "vqa_test.json"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir) -> Path:
    from helpers.trained_run import trained_run  # one tiny trained run per session, shared with merge/export

    return trained_run(tmp_path_factory, tiny_dir)


@pytest.fixture(scope="module")
def generator(run_dir) -> Generator:
    return Generator.load(run_dir)


def _segment_starts(labels: list[int]) -> list[int]:
    """Where each answer's labelled tokens begin."""
    return [
        i for i, lab in enumerate(labels) if lab != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)
    ]


# llava_med_v1's labels are v1.0's own masks, not the answers (its prompts: tests/unit/prompts/test_templates.py)
@pytest.mark.parametrize("template", sorted(TEMPLATES - {"llava_med_v1"}))
def test_prompt_equals_training_encoding_up_to_each_answer(generator, template):
    gen = Generator(generator.model, generator.processor, {**generator.info, "template": template})
    spec = EncodeSpec(template, gen.num_image_tokens, 100_000, gen.image_token)
    encoder = BatchEncoder(gen.tokenizer, spec)  # what training uses
    records = load_records(SAMPLE / "instruct.json", IMAGES)[:8] + load_records(TEST, IMAGES)[:4]
    assert any(len(r.rounds) > 1 for r in records)
    for record in records:
        batch = encoder.encode([record.rounds])
        ids, labels = batch.input_ids[0].as_py(), batch.labels[0].as_py()
        starts = _segment_starts(labels)
        rounds = record.rounds[:1] if template == "plain" else record.rounds
        assert len(starts) == len(rounds)
        for k, start in enumerate(starts):
            prompt = gen.prompt_ids([*rounds[:k], (rounds[k][0], None)])
            assert prompt == ids[:start], (template, record.id, k)
            assert prompt.count(gen.image_token_id) == gen.num_image_tokens


def test_image_preprocessing_is_the_training_collators(generator):
    from qlora_med.data.collate import VisionCollator

    paths = [IMAGES / "synpic32933.jpg", IMAGES / "xy_chromosome.jpg"]  # non-square: padding matters
    expected = VisionCollator(generator.processor, "pad").pixel_values([str(p) for p in paths], ["a", "b"])[0]
    assert np.array_equal(generator.pixel_values(paths, ["a", "b"])["pixel_values"].numpy(), expected.numpy())


def test_eval_vqa_cli_writes_answer_file_and_resumes(run_dir, tmp_path, caplog):
    pred = tmp_path / "pred.jsonl"
    args = [
        "eval",
        "vqa",
        "--model",
        str(run_dir),
        "--data",
        str(TEST),
        "--image-folder",
        str(IMAGES),
        "--out",
        str(pred),
        "--batch-size",
        "4",
        "--max-new-tokens",
        "6",
        "--no-progress",
    ]
    assert cli([*args, "--limit", "6"]) == 0
    first = pred.read_text().splitlines()
    rows = [json.loads(line) for line in first]
    test_ids = [r["id"] for r in json.loads(TEST.read_text())]
    assert [r["question_id"] for r in rows] == test_ids[:6]
    for row in rows:
        assert set(row) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert isinstance(row["text"], str) and "<image>" in row["prompt"]
        assert row["model_id"] == run_dir.name
        assert row["metadata"]["template"] == "mistral_instruct" and row["metadata"]["answer_type"] in (
            "OPEN",
            "CLOSED",
        )

    with pred.open("a") as fh:  # a crash in the middle of writing a line
        fh.write('{"question_id": 2006, "prompt": "wh')
    caplog.set_level(logging.INFO)
    assert cli(args) == 0
    lines = pred.read_text().splitlines()
    assert lines[:6] == first  # answered ids are skipped, not redone
    assert [json.loads(line)["question_id"] for line in lines] == test_ids
    assert "6 of 20 question(s) already answered, 14 to go" in caplog.text
    assert "partly written last line" in caplog.text
    assert cli(["eval", "score", "--data", str(TEST), "--pred", str(pred)]) == 0


def test_batch_size_does_not_change_greedy_answers(generator, tmp_path):
    questions = load_questions(TEST, IMAGES)
    sampling = Sampling(max_new_tokens=8)
    run_vqa(generator, questions, tmp_path / "b1.jsonl", "m", sampling, batch_size=1, progress=False)
    run_vqa(generator, questions, tmp_path / "b4.jsonl", "m", sampling, batch_size=4, progress=False)
    one, four = (
        [json.loads(x) for x in (tmp_path / f).read_text().splitlines()] for f in ("b1.jsonl", "b4.jsonl")
    )
    assert [r["text"] for r in one] == [r["text"] for r in four]
    assert [r["answer_id"] for r in one] == [r["answer_id"] for r in four]
    assert any(r["text"] for r in one)


def test_qa50_questions_are_accepted(generator, tmp_path):
    qa50 = tmp_path / "qa50.jsonl"
    rows = [
        {
            "question_id": 7,
            "image": "cell.png",
            "text": "Describe the image.\n<image>",
            "type": "detailed_description",
            "domain": {"histology": True},
        },
        {
            "question_id": 8,
            "image": "ihc.png",
            "text": "What stain is used?\n<image>",
            "type": "conversation",
        },
    ]
    qa50.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = load_questions(qa50, IMAGES)
    assert [q.id for q in questions] == ["7", "8"]
    assert (
        run_vqa(generator, questions, tmp_path / "a.jsonl", "m", Sampling(4), batch_size=2, progress=False)
        == 2
    )
    out = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in out] == [7, 8]
    assert out[0]["metadata"]["type"] == "detailed_description"
    assert read_done(tmp_path / "a.jsonl") == {"7", "8"}


def test_sampling_is_seeded_and_stop_strings_cut(generator):
    from transformers import set_seed

    q = load_questions(TEST, IMAGES)[0]
    ids, pixels = [generator.prompt_ids([(q.text, None)])], generator.pixel_values([q.image], [q.id])
    hot = Sampling(max_new_tokens=6, temperature=1.5, top_p=0.9)
    set_seed(1)
    a = generator.generate(ids, pixels, hot)
    set_seed(1)
    assert generator.generate(ids, pixels, hot) == a
    old = Generator(generator.model, generator.processor, {**generator.info, "template": "llava_med_v1"})
    assert old.clean(" yes, on the left.\n### Human: and?") == "yes, on the left."
    with pytest.raises(ValueError):
        Sampling(max_new_tokens=0)
