"""The paper's VQA metrics on hand-computed cases, and ``eval score`` end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from qlora_med.cli import main
from qlora_med.errors import DataError
from qlora_med.eval.metrics import (
    PAPER_KEYS,
    exact_match_score,
    f1_precision_recall,
    load_vqa_examples,
    normalize_answer,
    score_question,
    sentence_bleu,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("yes.", "yes"),
        ("the left lung", "left lung"),  # articles dropped
        ("an effusion in a lobe", "effusion in lobe"),
        ("two nodules, none calcified", "2 nodules 0 calcified"),  # number words; ", " deletes commas
        ("ten", "10"),
        ("dont know", "don't know"),  # contraction table
        ("isnt it", "isn't it"),
        ("left-sided", "left sided"),  # no neighbouring space: punctuation becomes a space
        ("left - sided", "left sided"),  # " -" present: every "-" is deleted
        ("x-ray (chest)", "x ray chest"),  # " (" deletes "("; ")" has no space next to it -> space
        ("1,000 cells-wide", "1000 cellswide"),  # digit,digit deletes every punctuation character
        ("3.5 cm.", "3.5 cm"),  # a period before a digit stays
        ("e.g. this", "eg this"),
        ("a;-b c-d", "b c d"),  # decisions look at the input, not at the partly processed string
        ("." * 40 + "x", "." * 8 + "x"),  # at most 32 periods are removed
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_contraction_table_quirks_kept() -> None:
    assert normalize_answer("somebody'd") == "somebodyd"  # reversed entry in the VQA v2 table
    assert normalize_answer("Im") == "im"  # capitalised keys never match after lower-casing


def test_f1_precision_recall_counts_repeated_prediction_words() -> None:
    # tp = 2 (prediction's count of "yes"), fp = 0, fn = 1 ("no")
    prf = f1_precision_recall("yes yes", "yes no")
    assert (prf.precision, prf.recall) == (1.0, pytest.approx(2 / 3))
    assert prf.f1 == pytest.approx(0.8)
    assert f1_precision_recall("the left lung", "left lung").f1 == 1.0
    assert f1_precision_recall("", "left lung").recall == 0.0  # empty prediction
    assert f1_precision_recall("right", "left").f1 == 0.0


def test_exact_match_score_is_distinct_gt_words_over_prediction_tokens() -> None:
    assert exact_match_score("left left lung", "left lung upper") == pytest.approx(2 / 3)
    assert exact_match_score("", "left") == 0.0


def test_sentence_bleu_hand_computed() -> None:
    ref = ["w", "x", "y", "z", "v"]
    assert sentence_bleu(ref, ["w", "x", "y", "z"], (0.25,) * 4) == pytest.approx(math.exp(1 - 5 / 4))
    assert sentence_bleu(["x", "y"], ["x", "x", "x"], (1, 0, 0, 0)) == pytest.approx(1 / 3)  # clipped
    assert sentence_bleu(["left", "lung"], ["left"], (1, 0, 0, 0)) == pytest.approx(math.exp(-1))
    assert sentence_bleu(["left"], ["right"], (0.25,) * 4) == 0.0  # no unigram match
    assert sentence_bleu(["left"], [], (1, 0, 0, 0)) == 0.0
    # An order with no match counts as sys.float_info.min, as NLTK without smoothing does.
    two = ["left", "lung"]
    assert sentence_bleu(two, two, (0, 0, 1, 0)) == pytest.approx(sys.float_info.min, rel=1e-9)
    assert sentence_bleu(two, two, (0.25,) * 4) == pytest.approx(sys.float_info.min**0.5)


def test_sentence_bleu_matches_nltk() -> None:
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    import random
    import warnings

    rng = random.Random(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(300):
            ref = [rng.choice("abcd") for _ in range(rng.randint(1, 6))]
            hyp = [rng.choice("abcd") for _ in range(rng.randint(0, 6))]
            for weights in [(0.25,) * 4, (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0)]:
                assert sentence_bleu(ref, hyp, weights) == bleu_score.sentence_bleu([ref], hyp, weights)


def test_closed_substring_rule_and_strict_block() -> None:
    normal = score_question("CLOSED", "No", "Normal")  # "no" is a substring of "normal"
    assert normal == {"yes/no accuracy": 1.0, "recall_closed": 0.0, "closed accuracy": 0.0}
    yes = score_question("CLOSED", "yes", "Yes, there is.")
    assert yes == {"yes/no accuracy": 1.0, "recall_closed": 1.0, "closed accuracy": 1.0}
    hedged = score_question("CLOSED", "yes", "There is no sign, yes")
    assert (hedged["yes/no accuracy"], hedged["closed accuracy"]) == (1.0, 0.0)
    empty = score_question("CLOSED", "no", "")
    assert set(empty.values()) == {0.0}
    choice = score_question("CLOSED", "Liver", "the liver")  # SLAKE-style non-yes/no closed answer
    assert choice["closed accuracy"] == 1.0


def test_open_scores() -> None:
    s = score_question("OPEN", "two", "Two.")
    assert s["open accuracy"] == s["recall"] == s["open exact match"] == s["bleu_score_1"] == 1.0
    s = score_question("OPEN", "no", "normal")
    assert (s["open accuracy"], s["recall"], s["open f1"]) == (1.0, 0.0, 0.0)
    s = score_question("OPEN", "left lung", "lung left lung")
    assert s["open exact match"] == 0.0
    assert s["open f1"] == pytest.approx(0.8)  # clipped overlap 2: P = 2/3, R = 1
    assert s["f1 score"] == 1.0  # the paper's F1 counts both "lung"s as true positives
    assert s["exact match score"] == pytest.approx(2 / 3)


# --- end to end through the CLI ---------------------------------------------------------------


def _vqa(qid: int, answer_type: str, question_type: str, answer: str) -> dict:
    return {
        "id": qid,
        "image": f"test/test_{qid:04d}.jpg",
        "answer_type": answer_type,
        "question_type": question_type,
        "conversations": [{"from": "human", "value": "Q?\n<image>"}, {"from": "gpt", "value": answer}],
    }


def _pred(qid: object, text: str) -> str:
    return json.dumps(
        {"question_id": qid, "prompt": "Q?", "text": text, "answer_id": "a", "model_id": "m", "metadata": {}}
    )


@pytest.fixture
def vqa_files(tmp_path: Path) -> tuple[Path, Path]:
    test = [
        _vqa(1, "OPEN", "POS", "left lung"),
        _vqa(2, "OPEN", "COUNT", "two"),
        _vqa(3, "CLOSED", "PRES", "no"),
        _vqa(4, "CLOSED", "PRES", "yes"),
    ]
    (tmp_path / "test.json").write_text(json.dumps(test))
    preds = [
        _pred(4, "Yes, there is."),
        _pred("3", "normal"),
        _pred(2, "three nodules"),
        _pred(1, "The left lung."),
    ]
    (tmp_path / "pred.jsonl").write_text("\n".join(preds) + "\n")
    return tmp_path / "test.json", tmp_path / "pred.jsonl"


def test_eval_score_json(vqa_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    test, pred = vqa_files
    assert main(["eval", "score", "--data", str(test), "--pred", str(pred), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    paper = report["overall"]["paper"]
    assert list(paper) == list(PAPER_KEYS)
    for key in ("exact match score", "f1 score", "precision", "recall", "open accuracy"):
        assert paper[key] == pytest.approx(50.0), key
    assert paper["bleu_score_1"] == paper["bleu_score_2"] == pytest.approx(50.0)
    assert paper["bleu_score"] == pytest.approx(0.0, abs=1e-100)
    assert paper["yes/no accuracy"] == 100.0
    assert paper["recall_closed"] == 50.0
    assert report["overall"]["strict"] == {"closed accuracy": 50.0, "open exact match": 50.0, "open f1": 50.0}
    assert report["overall"]["counts"] == {"total": 4, "open": 2, "closed": 2}
    pres = report["by_question_type"]["PRES"]
    assert pres["counts"] == {"total": 2, "open": 0, "closed": 2}
    assert pres["paper"]["recall"] is None and pres["paper"]["yes/no accuracy"] == 100.0
    assert report["by_answer_type"]["OPEN"]["paper"]["recall"] == 50.0


def test_eval_score_table(vqa_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    test, pred = vqa_files
    assert main(["eval", "score", "--data", str(test), "--pred", str(pred)]) == 0
    out = capsys.readouterr().out
    assert "yes/no accuracy" in out and "Questions: 4 (open 2, closed 2)" in out
    assert "question_type" in out and "COUNT" in out


def test_mismatched_ids_are_listed(tmp_path: Path) -> None:
    test = tmp_path / "test.json"
    test.write_text(json.dumps([_vqa(i, "OPEN", "x", "a") for i in range(15)]))
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n".join([_pred(i, "a") for i in range(3)] + [_pred(99, "a")]) + "\n")
    with pytest.raises(
        DataError, match=r"without a prediction: 12 \(3, 4, .*, 12, \.\.\.\).*not in the test file: 1 \(99\)"
    ):
        load_vqa_examples(test, pred)
    assert main(["eval", "score", "--data", str(test), "--pred", str(pred)]) == 1


def test_corrupt_prediction_line_names_file_and_line(tmp_path: Path) -> None:
    test = tmp_path / "test.json"
    test.write_text(json.dumps([_vqa(1, "OPEN", "x", "a")]))
    pred = tmp_path / "pred.jsonl"
    pred.write_text(_pred(1, "a") + '\n{"question_id": 2, "text": \n')
    with pytest.raises(DataError, match=r"pred\.jsonl:2: invalid JSON"):
        load_vqa_examples(test, pred)


def test_bad_answer_type_is_reported(tmp_path: Path) -> None:
    test = tmp_path / "test.json"
    test.write_text(json.dumps([_vqa(7, "MAYBE", "x", "a")]))
    (tmp_path / "pred.jsonl").write_text(_pred(7, "a") + "\n")
    with pytest.raises(DataError, match=r"record 0 \(id 7\): answer_type must be OPEN or CLOSED"):
        load_vqa_examples(test, tmp_path / "pred.jsonl")
