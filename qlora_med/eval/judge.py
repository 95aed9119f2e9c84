"""The paper's judged chat score (qa50): a judge LLM rates the reference and our answer from 1 to 10.

The judge is any OpenAI-compatible ``/chat/completions`` endpoint. It sees the figure caption and the
article sentences mentioning the figure, the question, the reference answer (``gpt4_answer``, as
"Assistant 1") and our answer ("Assistant 2"), and puts the two scores on its first line. The relative
score is the mean over questions of ours ÷ reference × 100, overall, by ``type`` and by the first true
``domain`` (LLaVA-Med's order: chest_xray, mri, histology, gross, ct_scan).

Scores are appended to a JSONL file as they arrive, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_med.errors import ConfigError, DataError, QloraMedError
from qlora_med.eval.metrics import read_jsonl

logger = logging.getLogger(__name__)

DOMAIN_ORDER = ("chest_xray", "mri", "histology", "gross", "ct_scan")
REPORT_ORDER = ("conversation", "detailed_description", *DOMAIN_ORDER, "overall")
_MAX_DELAY_S = 60.0

SYSTEM_PROMPT = "You are an impartial, exacting reviewer of answers to questions about biomedical images."
INSTRUCTIONS = (
    "Two AI assistants answered the question above about a biomedical image. You cannot see the image: "
    "the figure caption and the article sentences that mention the figure describe it for you.\n"
    "Rate each answer for helpfulness, relevance, accuracy and level of detail on a scale from 1 to 10, "
    "where 10 is best.\n"
    "Write the two scores on the first line, Assistant 1's first, separated by a space (for example: 7 9), "
    "with nothing else on that line. From the second line on, explain your ratings briefly. Judge the "
    "content only: neither the order in which the answers appear nor their length may sway the scores."
)


class JudgeError(QloraMedError):
    """The judge could not score a question (after retries), or refused the request outright."""


class JudgeRefused(JudgeError):
    """The judge rejected the request itself (HTTP 4xx other than 429): retrying cannot help."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to call the judge."""

    url: str  # base URL (".../v1") or the full ".../chat/completions" endpoint
    model: str
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 4  # requests in flight at most
    retries: int = 3  # extra attempts per question after the first
    backoff_s: float = 2.0  # first retry delay; doubles per attempt (a Retry-After header wins)
    timeout_s: float = 120.0
    temperature: float = 0.0
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if not re.match(r"https?://", self.url):
            raise ConfigError(f"--judge-url must start with http:// or https://, got {self.url!r}")
        if self.concurrency < 1 or self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ConfigError("--concurrency must be >= 1, --retries >= 0, --backoff >= 0, --timeout > 0")

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


@dataclass(frozen=True)
class ChatItem:
    """One qa50 question joined with our answer."""

    question_id: Any
    question: str
    reference: str
    answer: str
    context: str
    type: str
    domain: str

    @property
    def key(self) -> str:
        return str(self.question_id)


@dataclass
class ChatGroup:
    """Mean judge scores for one group; ``relative`` = mean(ours ÷ reference) × 100."""

    count: int
    reference_score: float
    model_score: float
    relative: float


def first_domain(domain: Any) -> str:
    """The first true domain in LLaVA-Med's order, then any other true key; ``none`` if none is true."""
    if not isinstance(domain, dict):
        return "none"
    keys = [k for k in DOMAIN_ORDER if k in domain] + [k for k in domain if k not in DOMAIN_ORDER]
    return next((k for k in keys if domain[k]), "none")


def _context(rec: dict[str, Any]) -> str:
    caption = str(rec.get("fig_caption") or "").strip()
    label = str(rec.get("fig_label") or "").strip()
    mentions = rec.get("in_text_mention") or []
    if isinstance(mentions, (str, dict)):
        mentions = [mentions]
    texts = [str(m.get("tokens", "")) if isinstance(m, dict) else str(m) for m in mentions]
    lines = [f"Caption ({label}): {caption}" if label else f"Caption: {caption}"]
    lines += ["Article sentences mentioning the figure:"] + [f"- {t.strip()}" for t in texts if t.strip()]
    return "\n".join(lines)


def load_items(answers_path: Path, questions_path: Path) -> list[ChatItem]:
    """Join the qa50 questions with an answer JSONL by ``question_id``; every question needs an answer."""
    answer_list = read_jsonl(answers_path)
    answers = {str(a.get("question_id")): a for a in answer_list}
    if len(answers) != len(answer_list):
        raise DataError(f"{answers_path}: repeated question_id values")
    items, missing = [], []
    for lineno, rec in enumerate(read_jsonl(questions_path), start=1):
        for key in ("question_id", "text", "gpt4_answer", "type"):
            if rec.get(key) is None:
                raise DataError(f"{questions_path} record {lineno}: missing field {key!r}")
        answer = answers.pop(str(rec["question_id"]), None)
        if answer is None or answer.get("text") is None:
            missing.append(str(rec["question_id"]))
            continue
        items.append(
            ChatItem(
                question_id=rec["question_id"],
                question=str(rec["text"]).replace("<image>", "").strip(),
                reference=str(rec["gpt4_answer"]).strip(),
                answer=str(answer["text"]).strip(),
                context=_context(rec),
                type=str(rec["type"]),
                domain=first_domain(rec.get("domain")),
            )
        )
    if missing or answers:
        extra = list(answers)
        raise DataError(
            f"{answers_path} does not match {questions_path}: "
            f"{len(missing)} questions without an answer {missing[:10]}, "
            f"{len(extra)} answers for unknown questions {extra[:10]}"
        )
    return items


def build_messages(item: ChatItem) -> list[dict[str, str]]:
    """The chat messages sent to the judge for one question."""
    user = (
        f"[Image description]\n{item.context}\n\n[Question]\n{item.question}\n\n"
        f"[Assistant 1]\n{item.reference}\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{item.answer}\n[End of Assistant 2]\n\n[Task]\n{INSTRUCTIONS}"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:\s*/\s*10(?![\d.]))?")


def parse_scores(text: str) -> tuple[float, float]:
    """(reference score, our score) from a judge reply; raises ``ValueError`` when there are none.

    Reads two numbers from the first non-empty line ("8 7", "8, 7", "**8/10 7/10**", "Assistant 1: 8,
    Assistant 2: 7"); failing that, "Assistant 1 ... N" and "Assistant 2 ... M" anywhere in the reply.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("empty judge reply")
    first = re.sub(r"assistant\s*[12]\b", "", lines[0].replace("*", ""), flags=re.IGNORECASE)
    numbers = [float(m.group(1)) for m in _NUMBER.finditer(first)]
    if len(numbers) != 2:
        found = [re.search(rf"assistant\s*{i}\b[^\d\n]*(\d+(?:\.\d+)?)", text, re.IGNORECASE) for i in (1, 2)]
        if not all(found):
            raise ValueError(f"no two scores on the first line: {lines[0][:80]!r}")
        numbers = [float(m.group(1)) for m in found if m]
    reference, ours = numbers
    if not (0 < reference <= 10 and 0 <= ours <= 10):
        raise ValueError(f"scores out of range 1-10: {reference:g} {ours:g}")
    return reference, ours


def _redact(text: str, cfg: JudgeConfig) -> str:
    return text.replace(cfg.api_key, "***") if cfg.api_key else text


def complete(cfg: JudgeConfig, messages: list[dict[str, str]]) -> str:
    """One chat-completions call; raises ``_Retryable`` for 429/5xx/connection trouble, ``JudgeRefused``
    for other HTTP errors."""
    payload = {
        "model": cfg.model,
        "messages": messages,
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
    }
    headers = {"Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    request = urllib.request.Request(cfg.endpoint, json.dumps(payload).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        detail = _redact(err.read().decode("utf-8", "replace")[:300], cfg)
        if err.code == 429 or err.code >= 500:
            retry_after = err.headers.get("Retry-After", "") if err.headers else ""
            delay = float(retry_after) if re.fullmatch(r"\d+(\.\d+)?", retry_after.strip()) else None
            raise _Retryable(f"HTTP {err.code}: {detail}", delay) from err
        raise JudgeRefused(f"judge at {cfg.endpoint} answered HTTP {err.code}: {detail}") from err
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as err:
        raise _Retryable(f"{type(err).__name__}: {_redact(str(err), cfg)}") from err
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise _Retryable(f"unexpected reply: {body[:200]!r}") from err
    if not isinstance(content, str):
        raise _Retryable(f"unexpected reply content: {content!r}")
    return content


def judge_one(
    cfg: JudgeConfig, item: ChatItem, sleep: Callable[[float], None] = time.sleep
) -> dict[str, Any]:
    """Score one question, retrying with exponential backoff; returns the score-file record."""
    messages, problem = build_messages(item), ""
    for attempt in range(cfg.retries + 1):
        try:
            reply = complete(cfg, messages)
            reference, ours = parse_scores(reply)
        except (_Retryable, ValueError) as err:
            problem = str(err)
            if attempt == cfg.retries:
                break
            delay = getattr(err, "retry_after", None) or cfg.backoff_s * 2**attempt * (
                1 + 0.1 * random.random()
            )
            logger.warning("question %s: %s; retrying in %.1f s", item.key, problem, min(delay, _MAX_DELAY_S))
            sleep(min(delay, _MAX_DELAY_S))
            continue
        return {
            "question_id": item.question_id,
            "type": item.type,
            "domain": item.domain,
            "reference_score": reference,
            "model_score": ours,
            "judge_model": cfg.model,
            "judge_output": reply,
            "answer": item.answer,
        }
    raise JudgeError(
        f"question {item.key}: no usable judge reply after {cfg.retries + 1} attempts ({problem})"
    )


def load_scores(path: Path, items: list[ChatItem], model: str) -> dict[str, dict[str, Any]]:
    """Scores already in ``path`` for these items; refuses a file made for other answers or judge."""
    if not path.exists():
        return {}
    by_key = {item.key: item for item in items}
    done = {}
    for lineno, rec in enumerate(read_jsonl(path), start=1):
        key = str(rec.get("question_id"))
        if key not in by_key:
            logger.warning("%s line %d: question %s is not in the question file; ignored", path, lineno, key)
            continue
        if rec.get("answer") != by_key[key].answer or rec.get("judge_model") != model:
            raise DataError(
                f"{path} line {lineno}: scored for a different answer or judge model than this run; "
                "pass a new --out (or delete the file) to score from scratch"
            )
        done[key] = rec
    return done


def run_judge(
    cfg: JudgeConfig, items: list[ChatItem], out: Path
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Score every item not yet in ``out`` (appending as results arrive); returns (records, failures)."""
    done = load_scores(out, items, cfg.model)
    todo = [item for item in items if item.key not in done]
    logger.info("%d questions already scored in %s, %d to go", len(done), out, len(todo))
    failures: dict[str, str] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as fh, ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        futures = {pool.submit(judge_one, cfg, item): item for item in todo}
        for future in as_completed(futures):
            item = futures[future]
            try:
                record = future.result()
            except JudgeRefused:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            except JudgeError as err:
                failures[item.key] = str(err)
                continue
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            done[item.key] = record
    return [done[item.key] for item in items if item.key in done], failures


def summarize(records: list[dict[str, Any]]) -> dict[str, ChatGroup]:
    """Per-group means, keyed in LLaVA-Med's report order (types, domains, overall) then any others."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for rec in records:
        pair = (float(rec["reference_score"]), float(rec["model_score"]))
        for name in (rec["type"], rec["domain"], "overall"):
            groups.setdefault(name, []).append(pair)
    names = [n for n in REPORT_ORDER if n in groups] + sorted(n for n in groups if n not in REPORT_ORDER)
    return {
        name: ChatGroup(
            count=len(groups[name]),
            reference_score=math.fsum(r for r, _ in groups[name]) / len(groups[name]),
            model_score=math.fsum(o for _, o in groups[name]) / len(groups[name]),
            relative=100 * math.fsum(o / r for r, o in groups[name]) / len(groups[name]),
        )
        for name in names
    }
