"""The bench's workloads: deterministic, curriculum-like lengths, real non-square images, and the baseline's own
templating gives the kit's tokens and labels."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from qlora_med.bench.suite import BENCH_DIR
from qlora_med.bench.workloads import fixed_length_records, image_sizes, length_stats, write_workload
from qlora_med.data.collate import VisionCollator
from qlora_med.data.encoder import BatchEncoder, EncodeSpec


@pytest.fixture(scope="module")
def workload(tmp_path_factory, processor):
    out = tmp_path_factory.mktemp("workload")
    return write_workload(out, processor.tokenizer, 64, seed=0)


def test_workload_is_deterministic(workload, processor, tmp_path):
    again = write_workload(tmp_path, processor.tokenizer, 64, seed=0)
    for mix in ("align", "instruct"):
        assert workload[mix].read_text() == again[mix].read_text()
    assert write_workload(tmp_path / "other", processor.tokenizer, 64, seed=1)["instruct"].read_text() != (
        again["instruct"].read_text()
    )


def test_lengths_follow_the_stated_distributions(workload, processor):
    align = length_stats(json.loads(workload["align"].read_text()), processor, "plain", 16, 4096)
    instruct = length_stats(json.loads(workload["instruct"].read_text()), processor, "mistral_instruct", 16, 4096)
    assert 50 <= align["text_tokens"]["median"] <= 85 and 150 <= align["text_tokens"]["p90"] <= 240
    assert align["rounds"] == {1: 64}
    assert 320 <= instruct["text_tokens"]["median"] <= 400 and 720 <= instruct["text_tokens"]["p90"] <= 950
    assert set(instruct["rounds"]) == {1, 2, 3, 4, 5}
    assert 0.5 < instruct["labelled_share"] < 0.95  # with 16 image tokens: most tokens are answers


def test_images_are_real_and_many_are_not_square(workload):
    sizes = image_sizes(workload["images"])
    assert len(sizes) >= 15
    assert sum(w != h for _, w, h in sizes) >= 8 and max(max(w, h) for _, w, h in sizes) >= 1000


def test_baseline_templating_matches_the_kit_token_for_token(workload, processor):
    """The hand-written loop tokenizes and masks like the kit (so first-step losses agree), without kit code."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec = importlib.util.spec_from_file_location("_baseline_for_test", BENCH_DIR / "baseline.py")
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    finally:
        sys.path.remove(str(BENCH_DIR))
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    for mix, template in (("align", "plain"), ("instruct", "mistral_instruct")):
        records = json.loads(workload[mix].read_text())[:12]
        rows = BatchEncoder(tok, EncodeSpec(template, 16, 2048)).encode(
            [[(records[i]["conversations"][k]["value"], records[i]["conversations"][k + 1]["value"])
              for k in range(0, len(records[i]["conversations"]), 2)] for i in range(len(records))])  # fmt: skip
        for i, record in enumerate(records):
            ids, labels = baseline.encode(record, mix, tok, image_id, 16, 2048)
            assert ids == rows.input_ids[i].as_py(), (mix, i)
            assert labels == rows.labels[i].as_py(), (mix, i)
    records = json.loads(workload["instruct"].read_text())[:6]  # and the same pixels (pad colour, resizing)
    kit_pixels, _ = VisionCollator(processor, "pad").pixel_values([str(workload["images"] / r["image"]) for r in records],
                                                                 [r["id"] for r in records])  # fmt: skip
    mine = baseline.collate(records, {"images": str(workload["images"]), "mix": "instruct", "max_length": 2048},
                            processor, image_id, 16)["pixel_values"]  # fmt: skip
    assert torch.equal(kit_pixels, mine)


def test_fixed_length_records_fill_the_context(processor):
    records = fixed_length_records(processor.tokenizer, 3, 200, ["a.png"])
    assert len(records) == 3 and all(r["image"] == "a.png" for r in records)
    answer = records[0]["conversations"][1]["value"]
    assert 190 <= len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 230
