"""The paper's VQA metrics, computed as LLaVA-Med v1.0's ``run_eval_batch.py`` does, plus a strict block.

The semantics follow ``FORMATS.md`` ("The paper's VQA metrics"): answers are lower-cased and normalised
(VQA v2 punctuation, period, number-word, article and contraction rules); the token metrics normalise a
second time internally. Every average is reported ×100; a metric with no questions of its kind is
``None``. Key names match the paper's tooling so the tables can be diffed.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_med.data.records import iter_json_objects
from qlora_med.errors import DataError

PAPER_KEYS = (
    "exact match score", "f1 score", "precision", "recall",
    "bleu_score", "bleu_score_1", "bleu_score_2", "bleu_score_3",
    "open accuracy", "yes/no accuracy", "recall_closed",
)  # fmt: skip
STRICT_KEYS = ("closed accuracy", "open exact match", "open f1")
_BLEU_WEIGHTS = {
    "bleu_score": (0.25, 0.25, 0.25, 0.25),
    "bleu_score_1": (1, 0, 0, 0),
    "bleu_score_2": (0, 1, 0, 0),
    "bleu_score_3": (0, 0, 1, 0),
}

# --- normalisation --------------------------------------------------------------------------------

_PUNCT = ';/[]"{}()=+\\_-><@`,?!'  # processed one character at a time, in this order
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# "A period not followed by a digit". The original pattern's leading "(?!<=\d)" is a (vacuous) lookahead.
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32  # the original passes re.UNICODE (== 32) where re.sub expects its count
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
} | {"none": "0"}
# VQA v2 evaluation contraction table, as "key=value" pairs. The capitalised keys can never match
# (answers are lower-cased first) and "somebody'd" maps to "somebodyd": both kept as in the official table.
_CONTRACTIONS = dict(
    pair.split("=")
    for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
    howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
    itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
    mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
    neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
    'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
    shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
    somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
    someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
    someones=someone's somethingd=something'd somethingd've=something'd've
    something'dve=something'd've somethingll=something'll thats=that's thered=there'd
    thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
    theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
    wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
    whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
    whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
    whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
    wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
    you'dve=you'd've youll=you'll youre=you're youve=you've
    """.split()
)


def normalize_answer(text: str) -> str:
    """Normalise one answer: punctuation, periods, number words, articles, contractions, commas."""
    # The delete-or-space decision looks at the input string, not at the partly processed one.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for ch in _PUNCT:
        deleted = delete_all or (ch + " ") in text or (" " + ch) in text
        out = out.replace(ch, "" if deleted else " ")
    out = _PERIOD.sub("", out, count=_MAX_PERIODS)
    words = []
    for word in out.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words).replace(",", "")


def _unigrams(text: str) -> Counter[str]:
    return Counter(text.lower().split())


# --- per-question metrics -------------------------------------------------------------------------


@dataclass(frozen=True)
class PRF:
    """Token F1 / precision / recall in the paper's definition (tp counts the prediction's words)."""

    f1: float
    precision: float
    recall: float


def f1_precision_recall(pred: str, gt: str) -> PRF:
    """The paper's token scores; normalises both strings again first (part of the definition)."""
    p, g = _unigrams(normalize_answer(pred)), _unigrams(normalize_answer(gt))
    if not p or not g:
        return PRF(0.0, 0.0, 0.0)
    tp = sum(c for w, c in p.items() if w in g)
    if tp == 0:
        return PRF(0.0, 0.0, 0.0)
    precision = tp / sum(p.values())  # tp + fp: every prediction token is either
    recall = tp / (tp + sum(c for w, c in g.items() if w not in p))
    return PRF(2 * precision * recall / (precision + recall), precision, recall)


def exact_match_score(pred: str, gt: str) -> float:
    """Distinct ground-truth words found in the prediction ÷ prediction tokens (after re-normalising)."""
    p, g = _unigrams(normalize_answer(pred)), _unigrams(normalize_answer(gt))
    total = sum(p.values())
    return sum(1 for w in g if w in p) / total if total else 0.0


def sentence_bleu(reference: Sequence[str], hypothesis: Sequence[str], weights: Sequence[float]) -> float:
    """NLTK ``sentence_bleu([reference], hypothesis, weights)`` without smoothing (its ``method0``).

    No unigram match gives 0; an order with no match contributes ``log(sys.float_info.min)``, so the
    score becomes vanishingly small rather than exactly 0, as in NLTK.
    """
    logs = []
    for n, weight in enumerate(weights, start=1):
        hyp = Counter(tuple(hypothesis[i : i + n]) for i in range(len(hypothesis) - n + 1))
        ref = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
        matched = sum(min(count, ref[gram]) for gram, count in hyp.items())
        if n == 1 and matched == 0:
            return 0.0
        precision = matched / max(1, sum(hyp.values())) if matched else sys.float_info.min
        logs.append(weight * math.log(precision))
    hyp_len, ref_len = len(hypothesis), len(reference)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(math.fsum(logs))


def token_f1(pred: str, gt: str) -> float:
    """Standard (SQuAD-style) token F1 on already normalised strings, clipped counts; both empty → 1."""
    p, g = _unigrams(pred), _unigrams(gt)
    if not p or not g:
        return float(p == g)
    common = sum((p & g).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(g.values())
    return 2 * precision * recall / (precision + recall)


def strict_closed_hit(pred_norm: str, gt_norm: str) -> bool:
    """Yes/no ground truth: the prediction's first word is that answer; other closed answers: equality."""
    if gt_norm in ("yes", "no"):
        return pred_norm.split()[:1] == [gt_norm]
    return pred_norm == gt_norm


def score_question(answer_type: str, gt: str, pred: str) -> dict[str, float]:
    """All metrics that apply to one question (fractions, not ×100), keyed by report name."""
    gt_n, pred_n = normalize_answer(gt.lower()), normalize_answer(pred.lower())
    hit = float(gt_n in pred_n)
    if answer_type == "CLOSED":
        return {
            "yes/no accuracy": hit,
            "recall_closed": f1_precision_recall(pred_n, gt_n).recall,
            "closed accuracy": float(strict_closed_hit(pred_n, gt_n)),
        }
    prf = f1_precision_recall(pred_n, gt_n)
    ref_tokens, hyp_tokens = gt_n.lower().split(), pred_n.lower().split()
    scores = {
        "exact match score": exact_match_score(pred_n, gt_n),
        "f1 score": prf.f1,
        "precision": prf.precision,
        "recall": prf.recall,
        "open accuracy": hit,
        "open exact match": float(pred_n == gt_n),
        "open f1": token_f1(pred_n, gt_n),
    }
    for key, weights in _BLEU_WEIGHTS.items():
        scores[key] = sentence_bleu(ref_tokens, hyp_tokens, weights)
    return scores


# --- aggregation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VqaExample:
    """One test question joined with its prediction."""

    qid: str
    answer_type: str  # OPEN | CLOSED
    question_type: str
    ground_truth: str
    prediction: str


@dataclass
class GroupScores:
    """Averages ×100 for one group of questions (``None`` where the group has no such question)."""

    paper: dict[str, float | None]
    strict: dict[str, float | None]
    counts: dict[str, int]


@dataclass
class VqaReport:
    """Overall scores plus breakdowns by ``answer_type`` and ``question_type``."""

    overall: GroupScores
    by_answer_type: dict[str, GroupScores] = field(default_factory=dict)
    by_question_type: dict[str, GroupScores] = field(default_factory=dict)


def aggregate(per_question: Sequence[tuple[VqaExample, dict[str, float]]]) -> GroupScores:
    """Average each metric over the questions that have it and scale by 100."""

    def mean(key: str) -> float | None:
        values = [scores[key] for _, scores in per_question if key in scores]
        return 100 * math.fsum(values) / len(values) if values else None

    n_open = sum(1 for ex, _ in per_question if ex.answer_type == "OPEN")
    return GroupScores(
        paper={key: mean(key) for key in PAPER_KEYS},
        strict={key: mean(key) for key in STRICT_KEYS},
        counts={"total": len(per_question), "open": n_open, "closed": len(per_question) - n_open},
    )


def score_vqa(examples: Iterable[VqaExample]) -> VqaReport:
    """Score every example and aggregate overall and per group."""
    scored = [(ex, score_question(ex.answer_type, ex.ground_truth, ex.prediction)) for ex in examples]
    report = VqaReport(overall=aggregate(scored))
    for attr, target in (("answer_type", report.by_answer_type), ("question_type", report.by_question_type)):
        groups: dict[str, list[tuple[VqaExample, dict[str, float]]]] = {}
        for item in scored:
            groups.setdefault(getattr(item[0], attr), []).append(item)
        for name in sorted(groups):
            target[name] = aggregate(groups[name])
    return report


# --- inputs ---------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; a bad line raises ``DataError`` naming the file and line."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read a JSON list of objects or JSONL (the training reader: errors name file, line and fix)."""
    records = []
    for number, record in iter_json_objects(Path(path)):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {number} is not a JSON object")
        records.append(record)
    return records


def _listing(ids: Sequence[str], first: int = 10) -> str:
    shown = ", ".join(ids[:first])
    return f"{len(ids)} ({shown}{', ...' if len(ids) > first else ''})"


def _duplicates(ids: Sequence[str]) -> list[str]:
    return [i for i, c in Counter(ids).items() if c > 1]


def read_table_records(source) -> list[dict[str, Any]]:
    """The VQA records of a parquet or Hub test set (a ``DataConfig``), without their images."""
    from qlora_med.data.tables import open_table

    return [record for _, record in open_table(source).rows(images=False)]


def load_vqa_examples(test_path: Path, pred_path: Path, source=None) -> list[VqaExample]:
    """Join a LLaVA-Med VQA test file with a prediction JSONL by id (``id`` ↔ ``question_id``).

    ``source``: a parquet or Hub test set (``DataConfig``) read instead of the file (``test_path`` names it).
    Ids compare as strings, so ``300648006`` and ``"300648006"`` match; order does not matter.
    """
    tests = read_records(test_path) if source is None else read_table_records(source)
    preds = read_jsonl(pred_path)
    gold: dict[str, tuple[str, str, str]] = {}
    for i, rec in enumerate(tests):
        where = f"{test_path} record {i} (id {rec.get('id')!r})"
        turns = rec.get("conversations", rec.get("conversatons"))
        if "id" not in rec or not isinstance(turns, list) or len(turns) < 2:
            raise DataError(f"{where}: needs 'id' and 'conversations' with a human and a gpt turn")
        answer_type = str(rec.get("answer_type", "")).strip().upper()
        if answer_type not in ("OPEN", "CLOSED"):
            raise DataError(f"{where}: answer_type must be OPEN or CLOSED, got {rec.get('answer_type')!r}")
        answer = turns[1].get("value") if isinstance(turns[1], dict) else None
        if answer is None:
            raise DataError(f"{where}: conversations[1] has no 'value'")
        gold[str(rec["id"])] = (answer_type, str(rec.get("question_type") or "unknown"), str(answer))
    if dup := _duplicates([str(r["id"]) for r in tests]):
        raise DataError(f"{test_path}: duplicate ids: {_listing(dup)}")

    answers: dict[str, str] = {}
    for i, rec in enumerate(preds):
        if "question_id" not in rec or "text" not in rec or rec["text"] is None:
            raise DataError(f"{pred_path} line {i + 1}: needs 'question_id' and 'text'")
        answers[str(rec["question_id"])] = str(rec["text"])
    if dup := _duplicates([str(r["question_id"]) for r in preds]):
        raise DataError(f"{pred_path}: duplicate question_ids: {_listing(dup)}")

    missing = [qid for qid in gold if qid not in answers]
    extra = [qid for qid in answers if qid not in gold]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"test ids without a prediction: {_listing(missing)}")
        if extra:
            parts.append(f"prediction ids not in the test file: {_listing(extra)}")
        raise DataError(f"{pred_path} does not match {test_path}: " + "; ".join(parts))
    return [VqaExample(qid, *gold[qid], answers[qid]) for qid in gold]
