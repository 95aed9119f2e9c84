"""Parquet files and Hub datasets as data sources: the Hub copies' schemas (VQA-RAD / PathVQA: image struct,
question, answer; SLAKE: img_name, answer_type, q_lang), written locally, read without network."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from huggingface_hub import constants

from qlora_med.cli import main as cli
from qlora_med.commands._options import COLUMN_FIELDS
from qlora_med.config.files import validate_paths
from qlora_med.config.loader import load_recipe
from qlora_med.config.schema import DataConfig, StageConfig
from qlora_med.config.sources import TABLE_COLUMNS
from qlora_med.data.build import build_stage_dataset
from qlora_med.data.check import check_table
from qlora_med.data.collate import VisionCollator
from qlora_med.data.model_text import load_model_text
from qlora_med.data.tables import cli_source, infer_answer_type, open_table
from qlora_med.errors import ConfigError, DataError, QloraMedError

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "data" / "sample"
IMAGES = SAMPLE / "images"
FEATURES = datasets.Features(
    {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
)


def _embedded(name: str) -> dict:
    """An image as the Hub copies embed it (``Dataset.to_parquet`` would store a local file's path only)."""
    return {"bytes": (IMAGES / name).read_bytes(), "path": name}


def _rows(name: str) -> dict[str, list]:
    """The sample VQA file as the Hub copies hold it: embedded image, question, answer (no id, no answer_type)."""
    records = json.loads((SAMPLE / name).read_text())
    return {
        "image": [_embedded(r["image"]) for r in records],
        "question": [r["conversations"][0]["value"].replace("\n<image>", "") for r in records],
        "answer": [r["conversations"][1]["value"] for r in records],
    }


@pytest.fixture(scope="module")
def vqa_rad(tmp_path_factory) -> Path:
    """A local copy of a flaviagiammarino/vqa-rad-style repo: data/{train,test}-00000-of-00001.parquet."""
    repo = tmp_path_factory.mktemp("vqa-rad")
    (repo / "data").mkdir()
    for split, name in (("train", "vqa_train.json"), ("test", "vqa_test.json")):
        datasets.Dataset.from_dict(_rows(name), features=FEATURES).to_parquet(
            repo / "data" / f"{split}-00000-of-00001.parquet"
        )
    return repo


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """A fresh datasets cache per test, and no network (the Hub stand-in test turns it back on, locally)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def model_text(tiny_dir):
    return load_model_text(str(tiny_dir))


def _parquet(path: Path, columns: dict[str, list], features=None) -> Path:
    datasets.Dataset.from_dict(columns, features=features).to_parquet(path)
    return path


def test_answer_type_is_closed_for_yes_no_answers_and_logged_with_counts(vqa_rad, caplog):
    assert [infer_answer_type(a) for a in ("yes", " No ", "YES\n", "normal", "no effusion", "1")] == [
        "CLOSED",
        "CLOSED",
        "CLOSED",
        "OPEN",
        "OPEN",
        "OPEN",
    ]
    caplog.set_level(logging.INFO, logger="qlora_med")
    table = open_table(DataConfig(path=str(vqa_rad), split="test"))
    rows = [r for _, r in table.rows()]
    expected = [r["answer_type"] for r in json.loads((SAMPLE / "vqa_test.json").read_text())]
    assert [
        r["answer_type"] for r in rows
    ] == expected  # the sample's own labels: yes/no are exactly the CLOSED ones
    n_closed = expected.count("CLOSED")
    assert (
        f"(split test): no answer_type column: inferred CLOSED for {n_closed} yes/no answers, OPEN for "
        f"{len(expected) - n_closed} others"
    ) in caplog.text
    first = rows[0]
    assert (
        first["id"] == 0
        and first["image"] == "ihc.png"
        and first["image_bytes"] == (IMAGES / "ihc.png").read_bytes()
    )
    assert first["conversations"] == [
        {"from": "human", "value": "what stain is used?\n<image>"},
        {"from": "gpt", "value": "immunohistochemistry"},
    ]


def test_slake_layout_image_paths_language_filter_and_column_mapping(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="qlora_med")
    slake = _parquet(
        tmp_path / "slake.parquet",
        {
            "img_name": ["cell.png", "retina.jpg", "cell.png"],
            "question": ["Is this a cell?", "这是什么?", "What organ?"],
            "answer": ["Yes", "视网膜", "Retina"],
            "answer_type": ["closed", "OPEN", "OPEN"],
            "q_lang": ["en", "zh", "en"],
            "qid": [11, 12, 13],
            "content_type": ["Abnormality", "Organ", "Organ"],
        },
    )
    rows = [r for _, r in open_table(DataConfig(path=str(slake), image_folder=str(IMAGES))).rows()]
    assert [(r["id"], r["image"], r["image_bytes"], r["answer_type"], r["question_type"]) for r in rows] == [
        (11, "cell.png", None, "CLOSED", "Abnormality"),
        (13, "cell.png", None, "OPEN", "Organ"),
    ]
    assert "kept 2 of 3 rows whose q_lang is 'en'" in caplog.text
    assert len(list(open_table(DataConfig(path=str(slake), language=None)).rows())) == 3
    # a table whose columns match no default is read through the mapping (recipe `columns:`, CLI --column)
    odd = _parquet(
        tmp_path / "odd.parquet",
        {"picture": [_embedded("cell.png")], "q": ["Is it a cell?"], "a": ["yes"]},
        datasets.Features(
            {"picture": datasets.Image(), "q": datasets.Value("string"), "a": datasets.Value("string")}
        ),
    )
    source = cli_source(str(odd), columns=["image=picture", "question=q", "answer=a"])
    assert source.columns == {"image": "picture", "question": "q", "answer": "a"}
    (row,) = [r for _, r in open_table(source).rows()]
    assert row["answer_type"] == "CLOSED" and row["image_bytes"] == (IMAGES / "cell.png").read_bytes()
    with pytest.raises(
        DataError, match=r"odd\.parquet: no question column .*columns found: \['picture', 'q', 'a'\]"
    ):
        open_table(DataConfig(path=str(odd), columns={"image": "picture", "answer": "a"}))
    assert COLUMN_FIELDS == tuple(TABLE_COLUMNS)


def test_parquet_without_image_column_is_one_clear_line(tmp_path, tiny_dir, caplog):
    bare = _parquet(tmp_path / "bare.parquet", {"question": ["Is it?"], "answer": ["yes"], "n": [1]})
    code = cli(["data", "check", str(bare), "--tokenizer", str(tiny_dir)])
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert code == 1 and len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith(f"{bare}: no image column (looked for image, img, img_name")
    assert (
        "columns found: ['question', 'answer', 'n']" in errors[0]
        and "columns: {image: <column>}" in errors[0]
    )
    assert "--column FIELD=COLUMN" in errors[0]
    with pytest.raises(DataError, match=r"column 'n' \(int64\) holds no images"):
        open_table(DataConfig(path=str(bare), columns={"image": "n"}))


def test_data_check_counts_an_undecodable_embedded_image(vqa_rad, tmp_path, model_text, tiny_dir, capsys):
    tok, n_image = model_text.tokenizer, model_text.image_tokens
    report = check_table(
        DataConfig(path=str(vqa_rad / "data" / "*.parquet")), tok, num_image_tokens=n_image, max_length=64
    )
    assert report.ok and report.records == 40 and report.images_found == 10 and report.layout == "parquet"
    rows = _rows("vqa_test.json")
    rows["image"][3] = {"bytes": b"not an image", "path": "broken.png"}
    broken = _parquet(tmp_path / "broken.parquet", rows, FEATURES)
    code = cli(["data", "check", str(broken), "--tokenizer", str(tiny_dir), "--max-length", "64"])
    out = capsys.readouterr().out
    assert (
        code == 1 and "11 found, 0 missing, 1 unreadable" in out and re.search(r"image unreadable +1\n", out)
    )
    assert "3 (#4): unreadable_image: embedded image 'broken.png'" in out and "NOT OK" in out


def test_recipe_keys_and_their_validation(vqa_rad, tmp_path, tiny_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "run"),
                "model": {"name_or_path": str(tiny_dir)},
                "stages": [
                    {
                        "name": "vqa",
                        "kind": "vqa",
                        "data": [
                            {"name": "rad", "hf": "flaviagiammarino/vqa-rad", "revision": "v1"},
                            {"name": "local", "path": str(vqa_rad), "split": "test"},
                            {
                                "name": "files",
                                "path": str(vqa_rad / "data" / "train-*.parquet"),
                                "columns": {"answer_type": "kind"},
                            },
                        ],
                    }
                ],
            }
        )
    )
    loaded = load_recipe(recipe)
    rad, local, files = loaded.stages[0].data
    assert (rad.hf, rad.split, rad.revision, rad.path, rad.image_folder) == (
        "flaviagiammarino/vqa-rad",
        "train",
        "v1",
        None,
        None,
    )
    assert local.split == "test" and files.columns == {"answer_type": "kind"}
    validate_paths(loaded)  # no image folder needed; a Hub id is looked up only when its data is built
    bad = [
        "stages.vqa.data.rad.path=x.json",
        "stages.vqa.data.local.path=null",
        "stages.vqa.data.files.columns.imag=x",
        "stages.vqa.data.local.hf=not-an-id",
    ]
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe, bad)
    message = str(info.value)
    assert (
        "stages.vqa.data.rad: set either path (a JSON/JSONL file, or parquet: a file, glob or folder) or hf"
        in message
    )
    assert "stages.vqa.data.rad.image_folder: required for a JSON/JSONL source" in message
    assert "stages.vqa.data.files.columns: unknown field 'imag'; did you mean 'image'?" in message
    assert "stages.vqa.data.local.hf: 'not-an-id' is not a Hub dataset id" in message
    missing = load_recipe(
        recipe,
        [
            f"stages.vqa.data.files.path={tmp_path}/none-*.parquet",
            f"stages.vqa.data.local.path={tmp_path / 'empty'}",
        ],
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as info:
        validate_paths(missing)
    assert f"stages.vqa.data.files.path: no .parquet file matches '{tmp_path}/none-*.parquet'" in str(
        info.value
    )
    assert f"stages.vqa.data.local.path: folder '{tmp_path / 'empty'}' has no .parquet file" in str(
        info.value
    )
    with pytest.raises(ConfigError, match=r"stages\.s\.data: no data: set path"):
        StageConfig(name="s", kind="vqa", data=DataConfig())


def _stage(*sources: DataConfig) -> StageConfig:
    return StageConfig(name="s", kind="vqa", max_length=128, data=list(sources))


def test_stage_data_keeps_images_encoded_until_the_collator(vqa_rad, tmp_path, processor, caplog):
    cache = tmp_path / "cache"
    source = DataConfig(path=str(vqa_rad), name="rad")
    dataset, stats = build_stage_dataset(_stage(source), processor, 16, "<image>", 0, cache)
    assert dataset.column_names == ["id", "image", "input_ids", "labels", "num_tokens", "image_bytes"]
    assert len(dataset) == 20 and not stats.sources[0].cache_hit and dataset[1]["id"] == "1"
    collator = VisionCollator(processor, "pad")
    batch = collator([dataset[i] for i in range(4)])
    from_files = collator.pixel_values([str(IMAGES / dataset[i]["image"]) for i in range(4)], list("abcd"))[0]
    assert torch.equal(batch["pixel_values"], from_files)  # the embedded bytes decode exactly as the files do
    again, stats = build_stage_dataset(_stage(source), processor, 16, "<image>", 0, cache)
    assert stats.sources[0].cache_hit and again["input_ids"] == dataset["input_ids"]
    # an image file source mixed with an embedded one: one set of columns, both kinds decoded per batch
    json_source = DataConfig(path=str(SAMPLE / "vqa_train.json"), image_folder=str(IMAGES), name="json")
    mixed, _ = build_stage_dataset(_stage(source, json_source), processor, 16, "<image>", 0, cache)
    assert len(mixed) == 40 and mixed[39]["image_bytes"] is None
    assert collator([mixed[0], mixed[39]])["pixel_values"].shape[0] == 2
    # an undecodable embedded image: counted and skipped in the collator, or before training (verify_images)
    rows = _rows("vqa_train.json")
    rows["image"][2] = {"bytes": rows["image"][2]["bytes"][:60], "path": None}  # a header that opens, cut short
    broken = _parquet(tmp_path / "broken.parquet", rows, FEATURES)
    skipping = DataConfig(path=str(broken), on_bad_record="skip")
    dataset, stats = build_stage_dataset(_stage(skipping), processor, 16, "<image>", 0, cache)
    collator = VisionCollator(processor, "pad", stats.on_bad_image)
    assert collator([dataset[i] for i in range(4)])["pixel_values"].shape[0] == 3 and collator.skipped == 1
    assert "skipping record 2 (unreadable_image): embedded image is unreadable" in caplog.text
    with pytest.raises(DataError, match="record 2: embedded image is unreadable"):
        VisionCollator(processor, "pad")([dataset[2]])
    verified, stats = build_stage_dataset(
        _stage(DataConfig(path=str(broken), on_bad_record="skip", verify_images=True)),
        processor,
        16,
        "<image>",
        0,
        cache,
    )
    assert len(verified) == 19 and stats.sources[0].skipped == {"unreadable_image": 1}
    assert "embedded image 'row-2' is unreadable" in stats.sources[0].skip_examples[0]


def test_train_evaluate_and_score_from_parquet(vqa_rad, tiny_dir, tmp_path, capsys):
    recipe = tmp_path / "vqa.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "run"),
                "model": {
                    "name_or_path": str(tiny_dir),
                    "compute_dtype": "fp32",
                    "cache_dir": str(tmp_path / "qcache"),
                },
                "stages": [
                    {
                        "name": "vqa",
                        "kind": "vqa",
                        "data": {"path": str(vqa_rad), "split": "train"},
                        "max_steps": 2,
                        "per_device_batch_size": 2,
                        "max_length": 128,
                        "logging_steps": 1,
                        "save_steps": 100,
                        "learning_rate": 5e-3,
                    }
                ],
            }
        )
    )
    assert cli(["train", str(recipe), "--stage", "vqa"]) == 0
    final = tmp_path / "run" / "vqa" / "final"
    info = json.loads((final / "stage.json").read_text())
    assert info["steps"] == 2 and info["samples"] == 20
    pred = tmp_path / "pred.jsonl"
    assert (
        cli(
            [
                "eval",
                "vqa",
                "--model",
                str(final),
                "--data",
                str(vqa_rad),
                "--split",
                "test",
                "--out",
                str(pred),
                "--max-new-tokens",
                "3",
                "--limit",
                "20",
                "--no-progress",
            ]
        )
        == 0
    )
    answers = [json.loads(line) for line in pred.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == list(range(20)) and answers[0]["metadata"][
        "image"
    ] == "ihc.png"
    capsys.readouterr()
    assert cli(["eval", "score", "--data", str(vqa_rad), "--pred", str(pred), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"] == str(vqa_rad) and report["overall"]["counts"] == {
        "total": 20,
        "open": 10,
        "closed": 10,
    }
    with pytest.raises(QloraMedError, match="--column: only for parquet and Hub sources"):
        cli_source(str(SAMPLE / "vqa_test.json"), columns=["image=x"])


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    """The Hub stand-in (127.0.0.1) for huggingface_hub and for ``datasets``, which reads its own settings."""
    from helpers.hub_env import serve_hub

    with serve_hub(monkeypatch, tmp_path / "hf-cache") as server:
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", server.url)
        monkeypatch.setattr(
            datasets.config, "HUB_DATASETS_URL", server.url + "/datasets/{repo_id}/resolve/{revision}/{path}"
        )
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "USE_PARQUET_EXPORT", False)  # no dataset-viewer service to ask
        yield server


def test_hub_dataset_then_the_offline_cache(vqa_rad, hub, monkeypatch, tmp_path, caplog):
    from helpers.hub_standin import HubModel

    files = {str(p.relative_to(vqa_rad)): p.read_bytes() for p in sorted(vqa_rad.rglob("*.parquet"))}
    hub.state.datasets["flaviagiammarino/vqa-rad"] = HubModel(
        {**files, "README.md": b"---\nlicense: cc0-1.0\n---\n"}
    )
    source = cli_source("hf:flaviagiammarino/vqa-rad", split="test")
    rows = [r for _, r in open_table(source).rows()]
    local = [r for _, r in open_table(DataConfig(path=str(vqa_rad), split="test")).rows()]
    assert rows == local and any("/resolve/" in r and "test-00000" in r for r in hub.state.requests)
    assert list(
        (tmp_path / "hf-cache").glob("datasets--flaviagiammarino--vqa-rad/snapshots/*/data/*.parquet")
    )
    with pytest.raises(QloraMedError, match=r"hf:flaviagiammarino/vqa-rad \(split val\): .*Unknown split"):
        open_table(cli_source("hf:flaviagiammarino/vqa-rad", split="val"))
    with pytest.raises(
        QloraMedError, match=r"hf:org/missing \(split train\): Dataset 'org/missing' doesn't exist.*HF_TOKEN"
    ):
        open_table(DataConfig(hf="org/missing"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.state.requests.clear()
    assert [r for _, r in open_table(source).rows()] == rows and hub.state.requests == []
    with pytest.raises(
        QloraMedError, match=r"hf:org/missing \(split train\): not in the local cache .*HF_HUB_OFFLINE=1"
    ):
        open_table(DataConfig(hf="org/missing"))
