"""``data convert`` on tiny fixtures laid out like the public VQA-RAD, SLAKE and PathVQA releases."""

from __future__ import annotations

import collections
import json
import os
import pickle
from pathlib import Path

import pytest
from PIL import Image

from qlora_med.cli import main
from qlora_med.data.convert import convert
from qlora_med.errors import DataError


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (120, 30, 60)).save(path)
    return path


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text())


@pytest.fixture
def vqa_rad(tmp_path: Path) -> Path:
    src = tmp_path / "VQA_RAD"
    for name in ("synpic1.jpg", "synpic2.jpg", "synpic3.jpg"):
        _image(src / "VQA_RAD Image Folder" / name)

    def rec(qid: int, image: str, question: str, answer: object, answer_type: str, phrase: str) -> dict:
        return {
            "qid": qid,
            "image_name": image,
            "image_organ": "CHEST",
            "question": question,
            "answer": answer,
            "answer_type": answer_type,
            "question_type": "PRES",
            "phrase_type": phrase,
        }

    records = [
        rec(10, "synpic1.jpg", "Is there a mass?", "No", "CLOSED", "freeform"),
        rec(11, "synpic1.jpg", "Is a mass present?", "No", "CLOSED ", "para"),  # stray space in the release
        rec(12, "synpic2.jpg", "How many nodules?", 2, "OPEN", "freeform"),
        rec(13, "synpic3.jpg", "Where is the lesion?", " left lung ", "OPEN", "test_freeform"),
        rec(14, "synpic3.jpg", "Is this a CT?", "yes", "CLOSED", "test_para"),
    ]
    (src / "VQA_RAD Dataset Public.json").write_text(json.dumps(records))
    return src


def test_vqa_rad(vqa_rad: Path, tmp_path: Path) -> None:
    result = convert("vqa-rad", vqa_rad, tmp_path / "out")
    train, test = _load(tmp_path / "out/train.json"), _load(tmp_path / "out/test.json")
    assert [r["id"] for r in train] == [10, 11, 12] and [r["id"] for r in test] == [13, 14]
    assert test[0] == {
        "id": 13,
        "image": "synpic3.jpg",
        "answer_type": "OPEN",
        "question_type": "PRES",
        "conversations": [
            {"from": "human", "value": "Where is the lesion?\n<image>"},
            {"from": "gpt", "value": "left lung"},
        ],
    }
    assert train[1]["answer_type"] == "CLOSED" and train[2]["conversations"][1]["value"] == "2"
    assert not (tmp_path / "out/val.json").exists()
    assert (tmp_path / "out/images/synpic3.jpg").is_file()
    assert (
        result.splits["train"].questions,
        result.splits["train"].closed,
        result.splits["train"].images,
    ) == (3, 2, 2)


def test_vqa_rad_missing_field_names_file_and_record(vqa_rad: Path, tmp_path: Path) -> None:
    path = vqa_rad / "VQA_RAD Dataset Public.json"
    records = _load(path)
    del records[1]["answer_type"]
    path.write_text(json.dumps(records))
    with pytest.raises(
        DataError, match=r"VQA_RAD Dataset Public\.json record 1: missing field 'answer_type'"
    ):
        convert("vqa-rad", vqa_rad, tmp_path / "out")


@pytest.fixture
def slake(tmp_path: Path) -> Path:
    src = tmp_path / "Slake1.0"
    for folder in ("xmlab1", "xmlab2", "xmlab3"):
        _image(src / "imgs" / folder / "source.jpg")

    def rec(qid: int, folder: str, question: str, answer: str, answer_type: str, lang: str = "en") -> dict:
        return {
            "img_id": int(folder[-1]),
            "img_name": f"{folder}/source.jpg",
            "question": question,
            "answer": answer,
            "q_lang": lang,
            "location": "Lung",
            "modality": "CT",
            "answer_type": answer_type,
            "base_type": "vqa",
            "content_type": "Organ",
            "triple": ["vhead", "_", "_"],
            "qid": qid,
        }

    (src / "train.json").write_text(
        json.dumps(
            [
                rec(1, "xmlab1", "Which organ is abnormal?", "Lung", "OPEN"),
                rec(2, "xmlab1", "图中异常的器官是什么?", "肺", "OPEN", lang="zh"),
                rec(3, "xmlab1", "Is the lung healthy?", "No", "CLOSED"),
            ]
        )
    )
    (src / "validate.json").write_text(json.dumps([rec(4, "xmlab2", "Is this a CT?", "Yes", "CLOSED")]))
    (src / "test.json").write_text(
        json.dumps([rec(5, "xmlab3", "Which is bigger, liver or spleen?", "Liver", "CLOSED")])
    )
    return src


def test_slake_keeps_english_and_links(
    slake: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["data", "convert", "slake", str(slake), "--out", str(out), "--link"]) == 0
    assert "left out 1 non-English questions" in capsys.readouterr().out
    train = _load(out / "train.json")
    assert [r["id"] for r in train] == [1, 3]
    assert train[0]["image"] == "xmlab1/source.jpg" and train[0]["question_type"] == "Organ"
    assert [r["id"] for r in _load(out / "val.json")] == [4]
    assert _load(out / "test.json")[0]["conversations"][1]["value"] == "Liver"
    assert os.path.samefile(out / "images/xmlab1/source.jpg", slake / "imgs/xmlab1/source.jpg")
    # A second run over the same output is fine.
    assert main(["data", "convert", "slake", str(slake), "--out", str(out)]) == 0


def test_slake_missing_image(slake: Path, tmp_path: Path) -> None:
    (slake / "imgs/xmlab3/source.jpg").unlink()
    with pytest.raises(DataError, match=r"test\.json record 0: image .*xmlab3/source\.jpg not found"):
        convert("slake", slake, tmp_path / "out")


@pytest.fixture
def pathvqa(tmp_path: Path) -> Path:
    src = tmp_path / "pvqa"
    _image(src / "images/train/train_0001.jpg")
    _image(src / "images/test/test_0007.jpg")
    (src / "qas/train").mkdir(parents=True)
    (src / "qas/test").mkdir(parents=True)
    train = [
        {"image": "train_0001", "question": "What have lost their nuclei?", "answer": "neutrophils"},
        {"image": "train_0001", "question": "Does this image show necrosis?", "answer": "yes"},
    ]
    with (src / "qas/train/train_qa.pkl").open("wb") as fh:
        pickle.dump(train, fh)
    test = [{"image": "test_0007", "question": "Is the liver enlarged?", "answer": "No"}]
    (src / "qas/test/test_qa.json").write_text(json.dumps(test))  # the JSON form of the same layout
    return src


def test_pathvqa(pathvqa: Path, tmp_path: Path) -> None:
    result = convert("pathvqa", pathvqa, tmp_path / "out")
    train = _load(tmp_path / "out/train.json")
    assert [(r["id"], r["answer_type"], r["question_type"]) for r in train] == [
        (0, "OPEN", "what"),
        (1, "CLOSED", "does"),
    ]
    assert train[0]["image"] == "train/train_0001.jpg"
    assert (tmp_path / "out/images/train/train_0001.jpg").is_file()
    test = _load(tmp_path / "out/test.json")
    assert test[0]["answer_type"] == "CLOSED" and test[0]["image"] == "test/test_0007.jpg"
    assert set(result.splits) == {"train", "test"}


def test_pathvqa_pickle_with_classes_is_refused(pathvqa: Path, tmp_path: Path) -> None:
    with (pathvqa / "qas/train/train_qa.pkl").open("wb") as fh:
        pickle.dump([collections.OrderedDict(image="train_0001", question="Q?", answer="yes")], fh)
    with pytest.raises(DataError, match=r"train_qa\.pkl: refusing to load collections\.OrderedDict"):
        convert("pathvqa", pathvqa, tmp_path / "out")


def test_pathvqa_missing_split(pathvqa: Path, tmp_path: Path) -> None:
    (pathvqa / "qas/test/test_qa.json").unlink()
    assert main(["data", "convert", "pathvqa", str(pathvqa), "--out", str(tmp_path / "out")]) == 1
