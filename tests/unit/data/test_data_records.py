"""Bad input gets a clear error naming file, record and fix, or a counted skip; odd images work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.legacy import encode_records, load_records
from PIL import Image

from qlora_med.data.collate import VisionCollator
from qlora_med.data.records import SkipLog
from qlora_med.errors import DataError

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "sample"


def _rec(rid, image="cell.png", turns=None):
    if turns is None:
        turns = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A cell."}]
    return {"id": rid, "image": image, "conversations": turns}


@pytest.fixture()
def folder(tmp_path) -> Path:
    shutil.copy(SAMPLE / "images" / "cell.png", tmp_path / "cell.png")
    return tmp_path


def _write(folder: Path, records, name="d.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(records) if name.endswith(".json") else "\n".join(map(json.dumps, records)))
    return path


@pytest.mark.parametrize("sample", ["alignment.json", "instruct.json", "vqa_train.json", "vqa_test.json"])
def test_sample_files_load(sample):
    records = load_records(SAMPLE / sample, SAMPLE / "images")
    assert len(records) == 20 or len(records) == 30
    assert all(r.image.is_file() and r.rounds for r in records)


BAD = {
    "missing_image": (_rec("r1", image="gone.png"), r"record r1 \(#1\): image '.*gone.png' not found \(check data.image_folder\)"),
    "no_image_token": (_rec("r2", turns=[{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}]),
                       r"record r2 \(#1\): needs exactly one '<image>' in the first human turn \(found 0\)"),
    "empty": (_rec("r3", turns=[]), r"record r3 \(#1\): has no 'conversations'"),
    "role_order": (_rec("r4", turns=[{"from": "gpt", "value": "<image>\nx"}, {"from": "human", "value": "y"}]),
                   r"record r4 \(#1\): turn 1: expected alternating human/gpt turns starting with human, got \['gpt', 'human'\]"),
    "odd_turns": (_rec("r5", turns=[{"from": "human", "value": "<image>\nq"}]), r"record r5 .*got \['human'\]"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_record_errors_name_file_record_and_fix(folder, kind):
    record, pattern = BAD[kind]
    path = _write(folder, [record])
    with pytest.raises(DataError, match=pattern) as err:
        load_records(path, folder)
    assert str(path) in str(err.value) and "on_bad_record: skip" in str(err.value)


def test_skip_mode_counts_and_keeps_good_records(folder, caplog):
    records = [_rec("good")] + [r for r, _ in BAD.values()] + [_rec("good")]
    skips = SkipLog(folder / "d.json")
    kept = load_records(_write(folder, records), folder, on_bad_record="skip", skips=skips)
    assert [r.id for r in kept] == ["good"]
    assert skips.total == 6 and skips.counts["duplicate_id"] == 1 and skips.counts["role_order"] == 2
    assert "skipped 6 record(s)" in caplog.text


def test_corrupt_json_names_line_and_column(folder):
    path = folder / "broken.json"
    path.write_text('[\n {"id": "a",\n  "image": "cell.png"\n  "conversations": []}\n]')
    with pytest.raises(DataError, match=r"broken.json: invalid JSON at line 4, column 3"):
        load_records(path, folder)


def test_corrupt_jsonl_line_is_named(folder):
    path = folder / "d.jsonl"
    path.write_text(json.dumps(_rec("a")) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl: line 2: invalid JSON"):
        load_records(path, folder)
    path.write_text(json.dumps(_rec("a")) + "\n\n" + json.dumps(_rec("b", image="cell.png")) + "\n")
    assert [r.id for r in load_records(path, folder)] == ["a", "b"]


def test_misspelled_conversations_key_is_accepted(folder):
    record = _rec("a")
    record["conversatons"] = record.pop("conversations")
    assert load_records(_write(folder, [record]), folder)[0].rounds == [("<image>\nWhat is shown?", "A cell.")]


def _odd_images(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    paths = {
        "grey": Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8), "L"),
        "rgba": Image.fromarray(rng.integers(0, 255, (30, 40, 4), dtype=np.uint8), "RGBA"),
        "cmyk": Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8), "RGB").convert("CMYK"),
        "16bit": Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)),
        "tall": Image.fromarray(rng.integers(0, 255, (3000, 3, 3), dtype=np.uint8), "RGB"),
        "wide": Image.fromarray(rng.integers(0, 255, (2, 900, 3), dtype=np.uint8), "RGB"),
        "palette": Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), "RGB").convert("P"),
    }
    out = {}
    for name, img in paths.items():
        out[name] = folder / f"{name}.{'jpg' if name == 'cmyk' else 'png'}"
        img.save(out[name])
    return out


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_collator_handles_odd_images(processor, folder, aspect):
    images = _odd_images(folder)
    records = [_rec(name, image=path.name) for name, path in images.items()]
    loaded = load_records(_write(folder, records), folder)
    dataset, stats = encode_records(loaded, processor, "mistral_instruct", 16, 128)
    batch = VisionCollator(processor, aspect)(list(dataset))
    assert batch["pixel_values"].shape == (len(images), 3, 56, 56)
    assert torch.isfinite(batch["pixel_values"]).all()
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert stats.truncated == 0


def test_pad_uses_the_processor_mean_colour(processor, folder):
    Image.new("RGB", (40, 10), (255, 255, 255)).save(folder / "strip.png")
    loaded = load_records(_write(folder, [_rec("s", image="strip.png")]), folder)
    dataset, _ = encode_records(loaded, processor, "mistral_instruct", 16, 128)
    pixels = VisionCollator(processor, "pad")(list(dataset))["pixel_values"][0]
    # the padded corner is the mean colour, which normalises to ~0; the centre is white (> 1.5)
    assert pixels[:, 0, 0].abs().max() < 0.05 and pixels[:, 28, 28].min() > 1.5


def _truncated_png(path: Path) -> None:
    """A header that opens (so the build's screen passes it) and pixel data that does not decode."""
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    path.write_bytes(path.read_bytes()[:60])


def test_unreadable_image_errors_or_is_skipped(processor, folder):
    _truncated_png(folder / "bad.png")
    loaded = load_records(_write(folder, [_rec("ok"), _rec("broken", image="bad.png")]), folder)
    dataset, _ = encode_records(loaded, processor, "mistral_instruct", 16, 128)
    with pytest.raises(DataError, match=r"record broken: image '.*bad.png' is unreadable .*on_bad_record: skip"):
        VisionCollator(processor, "pad")(list(dataset))
    collator = VisionCollator(processor, "pad", on_bad_record="skip")
    batch = collator(list(dataset))
    assert batch["input_ids"].shape[0] == 1 and collator.skipped == 1


def test_too_long_samples_are_truncated_and_counted(processor, folder):
    long_answer = "word " * 300
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": long_answer}]
    loaded = load_records(_write(folder, [_rec("long", turns=turns), _rec("short")]), folder)
    dataset, stats = encode_records(loaded, processor, "mistral_instruct", 16, 64)
    assert stats.truncated == 1 and max(len(x) for x in dataset["input_ids"]) == 64
