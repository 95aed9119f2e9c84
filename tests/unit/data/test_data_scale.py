"""Paper-scale data path: streamed JSON, batch encoding = per-record encoding, Arrow cache, DataLoader workers."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers.legacy import encode_records, load_records
from PIL import Image

import qlora_med.data.reading as reading_module
from qlora_med.config.schema import DataConfig, StageConfig
from qlora_med.data.build import build_stage_dataset
from qlora_med.data.collate import VisionCollator
from qlora_med.data.encoder import IMAGE_CUT, NO_ANSWER, BatchEncoder, EncodeSpec
from qlora_med.data.records import iter_json_objects
from qlora_med.errors import DataError, QloraMedError
from qlora_med.prompts.templates import KIT_TEMPLATES as TEMPLATES
from qlora_med.prompts.templates import encode, render

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "sample"


def _rec(rid, image="cell.png", q="<image>\nWhat is shown?", a="A cell."):
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


@pytest.fixture()
def folder(tmp_path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(SAMPLE / "images" / "cell.png", images / "cell.png")
    return images


def _stage(path: Path, folder: Path, **data) -> StageConfig:
    return StageConfig(name="s", kind="instruct", max_length=128,
                       data=DataConfig(path=str(path), image_folder=str(folder), **data))


def _build(stage, processor, cache, **kw):
    return build_stage_dataset(stage, processor, 16, "<image>", 0, cache, **kw)


def test_streamed_json_list_equals_json_loads_and_names_error_position(tmp_path, monkeypatch):
    monkeypatch.setattr(reading_module, "_CHUNK", 7)  # records straddle many chunk boundaries
    rng = random.Random(0)
    path = tmp_path / "f.json"
    for _ in range(60):
        objs = [rng.choice([_rec("a", a="x\n" * rng.randint(0, 3)), 12345.5e3, "s", [], {}, None])
                for _ in range(rng.randint(0, 5))]
        text = json.dumps(objs, indent=rng.choice([None, 1]))
        path.write_text(text)
        assert [o for _, o in iter_json_objects(path)] == objs
        cut = rng.randrange(1, len(text))
        bad = text[:cut] + rng.choice(["}", ",", "x", '"']) + text[cut + 1 :]
        path.write_text(bad)
        try:
            json.loads(bad)
        except json.JSONDecodeError as err:
            with pytest.raises(DataError, match=rf"invalid JSON at line {err.lineno}, column {err.colno}:"):
                list(iter_json_objects(path))


def test_batch_encoding_equals_encoding_each_record_alone(processor):
    tok = processor.tokenizer
    rounds = [r.rounds for f in ("alignment", "instruct", "vqa_train")
              for r in load_records(SAMPLE / f"{f}.json", SAMPLE / "images")]
    rounds.append([("<image>\nq", "ünïcödé ✓ 日本語 " * 5), ("follow  up\n", "  spaced  ")])
    image_id = tok.convert_tokens_to_ids("<image>")
    for template in sorted(TEMPLATES):
        for max_length in (20, 40, 64, 2048):
            out = BatchEncoder(tok, EncodeSpec(template, 16, max_length)).encode(rounds)
            ids, labels, kept = out.input_ids.to_pylist(), out.labels.to_pylist(), out.keep.tolist()
            for i, r in enumerate(rounds):
                try:
                    ref = encode(tok, render(template, r, "<image>", tok.bos_token, tok.eos_token), image_id, 16,
                                 max_length)
                except ValueError:
                    assert out.problems[i][0] == IMAGE_CUT
                    continue
                if all(label == -100 for label in ref.labels):
                    assert out.problems[i][0] == NO_ANSWER
                    continue
                k = kept.index(i)
                assert (ids[k], labels[k]) == (ref.input_ids, ref.labels), (template, max_length, i)


def test_built_dataset_equals_records_encoded_one_at_a_time(processor, tmp_path):
    stage = StageConfig(name="s", kind="instruct", max_length=64,
                        data=DataConfig(path=str(SAMPLE / "instruct.json"), image_folder=str(SAMPLE / "images")))
    dataset, stats = _build(stage, processor, tmp_path / "cache")
    alone, alone_stats = encode_records(load_records(SAMPLE / "instruct.json", SAMPLE / "images"), processor,
                                        "mistral_instruct", 16, 64)
    for column in ("id", "image", "input_ids", "labels"):
        assert dataset[column] == alone[column]
    assert stats.truncated == alone_stats.truncated > 0 and stats.samples == len(alone)
    assert sum(stats.sources[0].dropped.values()) == alone_stats.dropped


def test_second_build_is_a_cache_hit_and_does_not_tokenize(processor, folder, tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(_rec(f"r{i}", a="word " * (i + 1))) for i in range(50)))
    cache = tmp_path / "cache"
    first, stats = _build(_stage(path, folder), processor, cache)
    entry = Path(stats.sources[0].cache)
    mtimes = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    assert not stats.sources[0].cache_hit and any(name.endswith(".arrow") for name in mtimes)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr(BatchEncoder, "encode", no_tokenizing)
    second, stats = _build(_stage(path, folder), processor, cache)
    assert stats.sources[0].cache_hit and Path(stats.sources[0].cache) == entry
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == mtimes
    assert second["input_ids"] == first["input_ids"] and second["id"] == first["id"]


def test_cache_is_rebuilt_when_the_file_or_the_settings_change(processor, folder, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([_rec("a"), _rec("b")]))
    cache = tmp_path / "cache"
    _, old = _build(_stage(path, folder), processor, cache)
    path.write_text(json.dumps([_rec("a"), _rec("b", a="Two cells.")]))  # same size class, new content
    dataset, new = _build(_stage(path, folder), processor, cache)
    assert not new.sources[0].cache_hit and new.sources[0].cache != old.sources[0].cache
    assert not Path(old.sources[0].cache).exists(), "the stale entry of the old file version is pruned"
    assert processor.tokenizer.decode(dataset[1]["input_ids"][-5:]).endswith("Two cells.</s>")
    longer = _stage(path, folder)
    longer.max_length = 256
    _, other = _build(longer, processor, cache)
    assert not other.sources[0].cache_hit and Path(new.sources[0].cache).exists()


def test_skip_counts_survive_the_cache_and_errors_match_load_records(processor, folder, tmp_path, caplog):
    rows = [_rec("good"), _rec("gone", image="gone.png"), _rec("noimg", q="What?"), _rec("good"),
            {"id": "roles", "image": "cell.png", "conversations": [{"from": "gpt", "value": "<image>\nx"},
                                                                     {"from": "human", "value": "y"}]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError) as built_err:
        _build(_stage(path, folder), processor, tmp_path / "cache")
    with pytest.raises(DataError) as legacy_err:
        load_records(path, folder)
    assert str(built_err.value) == str(legacy_err.value)
    expected = {"missing_image": 1, "no_image_token": 1, "duplicate_id": 1, "role_order": 1}
    for hit in (False, True):
        dataset, stats = _build(_stage(path, folder, on_bad_record="skip"), processor, tmp_path / "cache")
        source = stats.sources[0]
        assert source.cache_hit is hit and source.skipped == expected and dataset["id"] == ["good"]
        assert stats.on_bad_image == "skip"
    assert "4 record(s) skipped when cached" in caplog.text


def test_verify_images_skips_unreadable_images(processor, folder, tmp_path):
    (folder / "bad.png").write_bytes(b"not a png")
    path = tmp_path / "d.json"
    path.write_text(json.dumps([_rec("ok"), _rec("broken", image="bad.png")]))
    dataset, stats = _build(_stage(path, folder, on_bad_record="skip", verify_images=True), processor, tmp_path / "c")
    assert dataset["id"] == ["ok"] and stats.sources[0].skipped == {"unreadable_image": 1}


def test_image_tokens_that_cannot_fit_raise_naming_the_record(processor, folder, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([_rec("a", q="<image>\n" + "long question " * 40)]))
    stage = StageConfig(name="s", kind="instruct", max_length=12,
                        data=DataConfig(path=str(path), image_folder=str(folder)))
    with pytest.raises(QloraMedError, match=r"d.json: record a: max_length=12 cannot hold the 16 image tokens"):
        _build(stage, processor, tmp_path / "cache")


def test_parallel_tokenization_and_collator_with_two_dataloader_workers(processor, folder, tmp_path):
    Image.new("RGB", (64, 64)).save(folder / "bad.png")  # opens (passes the build's screen), does not decode
    (folder / "bad.png").write_bytes((folder / "bad.png").read_bytes()[:60])
    rows = [_rec(f"r{i}", image="bad.png" if i == 7 else "cell.png", a="word " * (1 + i % 30)) for i in range(120)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    stage = _stage(path, folder, on_bad_record="skip")
    parallel, stats = _build(stage, processor, tmp_path / "c2", num_proc=2)
    single, _ = _build(stage, processor, tmp_path / "c1", num_proc=1)
    assert stats.sources[0].num_proc == 2 and len(list(Path(stats.sources[0].cache).glob("*.arrow"))) == 2
    assert parallel["input_ids"] == single["input_ids"] and parallel["id"] == single["id"]

    collator = VisionCollator(processor, "pad", on_bad_record=stats.on_bad_image)
    loader = torch.utils.data.DataLoader(parallel, batch_size=8, num_workers=2, collate_fn=collator)
    rows_seen = 0
    for batch in loader:
        assert batch["pixel_values"].shape[1:] == (3, 56, 56)
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        rows_seen += batch["input_ids"].shape[0]
    assert rows_seen == 119 and collator.skipped == 1, "the workers' skip count reaches the main process"
