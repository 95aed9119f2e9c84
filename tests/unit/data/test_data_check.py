"""``qlora-med data check``: the sample data is clean; a broken file gets every problem counted and named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlora_med.cli import main as cli_main
from qlora_med.data.check import check_file
from qlora_med.data.model_text import load_model_text

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "sample"


def _rec(rid, image="cell.png", turns=None):
    turns = turns or [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A cell."}]
    return {"id": rid, "image": image, "conversations": turns}


@pytest.fixture(scope="module")
def model_text(tiny_dir):
    return load_model_text(str(tiny_dir))


@pytest.mark.parametrize("name", ["alignment", "instruct", "vqa_train", "vqa_test"])
def test_sample_files_are_clean(model_text, name):
    tok, n_image = model_text.tokenizer, model_text.image_tokens
    report = check_file(SAMPLE / f"{name}.json", SAMPLE / "images", tok, num_image_tokens=n_image, max_length=64)
    assert report.ok and report.unusable == 0 and not report.problems
    assert report.records == len(json.loads((SAMPLE / f"{name}.json").read_text()))
    assert report.images_found == 10 and report.images_missing == report.images_unreadable == 0
    assert report.format == {"alignment": "alignment", "instruct": "instruct"}.get(name, "vqa")
    assert len(report.lengths) == report.records and report.lengths.min() > n_image == 16
    if name == "instruct":  # long multi-turn conversations exceed 64 tokens: counted, not unusable
        assert report.over_max_length > 0 and report.turns > 2 * report.records


def test_cli_on_sample_data_exits_zero_with_histogram(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # default tokenizer: Mistral, cached here
    png = tmp_path / "lengths.png"
    code = cli_main(["data", "check", str(SAMPLE / "alignment.json"), "--image-folder", str(SAMPLE / "images"),
                     "--histogram", str(png)])
    out = capsys.readouterr().out
    assert code == 0 and "OK: every record is usable" in out
    assert "576 image tokens" in out and "template plain" in out and "records without <image>  0" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "xdg" / "qlora-med" / "tokenizers").glob("mistral-*/tokenizer.json"))


def _broken(folder: Path) -> Path:
    shutil.copy(SAMPLE / "images" / "cell.png", folder / "cell.png")
    (folder / "bad.png").write_bytes(b"not a png")
    lines = [
        json.dumps(_rec("good")),
        json.dumps(_rec("lost", image="gone.png")),
        json.dumps(_rec("noimg", turns=[{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}])),
        json.dumps(_rec("roles", turns=[{"from": "gpt", "value": "<image>\nx"}, {"from": "human", "value": "y"}])),
        json.dumps(_rec("good")),
        json.dumps(_rec("broken", image="bad.png")),
        '{"id": "cut", "image": "cell.png", "conversations": [',
        json.dumps(_rec("fine")),
    ]
    path = folder / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_broken_file_counts_every_problem(model_text, tmp_path):
    tok, n_image = model_text.tokenizer, model_text.image_tokens
    report = check_file(_broken(tmp_path), tmp_path, tok, num_image_tokens=n_image)
    assert report.layout == "JSONL" and report.records == 8 and not report.ok
    assert dict(report.problems) == {"missing_image": 1, "no_image_token": 1, "role_order": 1, "duplicate_id": 1,
                                      "unreadable_image": 1, "invalid_json": 1}
    assert report.unusable == 6
    assert report.images_found == 2 and report.images_missing == 1 and report.images_unreadable == 1
    listed = "\n".join(report.first_unusable)
    for rid in ("lost (#2)", "noimg (#3)", "roles (#4)", "good (#5)", "broken (#6)", "line 7 (#7)"):
        assert rid in listed
    assert "fine" not in listed and "good (#1)" not in listed


def test_cli_on_broken_file_exits_nonzero_and_lists_ids(tiny_dir, tmp_path, capsys):
    path = _broken(tmp_path)
    code = cli_main(["data", "check", str(path), "--image-folder", str(tmp_path), "--tokenizer", str(tiny_dir),
                     "--list", "3"])
    out = capsys.readouterr().out
    assert code == 1 and "NOT OK" in out and "unusable records         6" in out
    assert "first unusable records (of 6):" in out and "lost (#2): missing_image" in out
    assert "roles (#4): role_order" in out and "broken (#6)" not in out  # only --list 3 are listed
    assert "role-order problems      1" in out and "duplicate ids            1" in out


def test_max_length_too_small_for_the_image_is_unusable(model_text, tmp_path):
    tok = model_text.tokenizer
    shutil.copy(SAMPLE / "images" / "cell.png", tmp_path / "cell.png")
    path = tmp_path / "d.json"
    path.write_text(json.dumps([_rec("a", turns=[{"from": "human", "value": "Long question " * 20 + "<image>"},
                                                 {"from": "gpt", "value": "x"}])]))
    report = check_file(path, tmp_path, tok, template="vicuna_v1", num_image_tokens=16, max_length=40)
    assert not report.ok and report.problems == {"image_tokens_do_not_fit": 1}
    assert report.over_max_length == 1


def test_broken_json_list_names_line_and_column(tiny_dir, tmp_path, caplog):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"id": "a",\n  "image": "cell.png"\n  "conversations": []}\n]')
    code = cli_main(["data", "check", str(path), "--image-folder", str(tmp_path), "--tokenizer", str(tiny_dir)])
    assert code == 1 and "bad.json: invalid JSON at line 4, column 3" in caplog.text
