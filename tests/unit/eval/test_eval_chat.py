"""``eval chat`` against a stand-in judge: an OpenAI-style HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qlora_med.cli import main
from qlora_med.eval.judge import first_domain, parse_scores

KEY = "sk-test-secret-123"
MAX_REQUESTS = 40  # the stand-in refuses more, so a retry loop cannot run away


@pytest.mark.parametrize(
    ("reply", "scores"),
    [
        ("8 7\nAssistant 1 is more complete.", (8.0, 7.0)),
        ("\n  8, 6.5  \nbecause", (8.0, 6.5)),
        ("**8/10** **6/10**\n...", (8.0, 6.0)),
        ("Assistant 1: 9\nAssistant 2: 4\nReasons...", (9.0, 4.0)),
        ("Scores - Assistant 1: 7/10, Assistant 2: 8/10", (7.0, 8.0)),
    ],
)
def test_parse_scores(reply: str, scores: tuple[float, float]) -> None:
    assert parse_scores(reply) == scores


@pytest.mark.parametrize("reply", ["", "I cannot rate these answers.", "0 5", "11 3", "7"])
def test_parse_scores_rejects(reply: str) -> None:
    with pytest.raises(ValueError):
        parse_scores(reply)


def test_first_domain_uses_llava_med_order() -> None:
    domain = {"chest_xray": False, "mri": False, "ct_scan": True, "histology": True, "gross": False}
    assert first_domain(domain) == "histology"
    assert first_domain(dict.fromkeys(domain, False)) == "none"


class Judge:
    """Scripted judge: ``replies[question]`` is a list of (status, text) served in turn, the last repeating."""

    def __init__(self) -> None:
        self.replies: dict[str, list[tuple[int, str]]] = {}
        self.requests: list[dict] = []
        self.auth: set[str] = set()
        self.lock = threading.Lock()

    def respond(self, body: dict) -> tuple[int, str]:
        question = re.search(r"\[Question\]\n(.*)\n", body["messages"][-1]["content"]).group(1)
        with self.lock:
            self.requests.append(body)
            if len(self.requests) > MAX_REQUESTS:
                return 400, "too many requests in this test"
            script = self.replies[question]
            return script.pop(0) if len(script) > 1 else script[0]


@pytest.fixture
def judge(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Judge, str]]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QLORA_MED_JUDGE_KEY", KEY)
    state = Judge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            state.auth.add(self.headers.get("Authorization", ""))
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, text = state.respond(body)
            if status == 200:
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
            else:
                payload = json.dumps({"error": {"message": text}})
            data = payload.encode()
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _domain(name: str) -> dict[str, bool]:
    return {d: d == name for d in ("chest_xray", "mri", "ct_scan", "histology", "gross")}


@pytest.fixture
def qa_files(tmp_path: Path) -> tuple[Path, Path]:
    questions = [
        ("What organ is shown?", "conversation", "histology", "The conjunctiva."),
        ("Describe the image.", "detailed_description", "chest_xray", "A frontal chest radiograph ..."),
        ("What technique was used?", "conversation", "ct_scan", "SPECT imaging."),
    ]
    lines = [
        {
            "question_id": i,
            "image": f"{i}.jpg",
            "text": f"{q}\n<image>",
            "type": t,
            "domain": _domain(d),
            "gpt4_answer": ref,
            "fig_label": "Fig. 1",
            "fig_caption": "A caption.",
            "in_text_mention": [{"tokens": "As shown in Fig. 1 .", "entities": []}],
        }
        for i, (q, t, d, ref) in enumerate(questions)
    ]
    (tmp_path / "qa50.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    answers = [{"question_id": i, "prompt": "", "text": f"answer {i}", "model_id": "m"} for i in range(3)]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(x) + "\n" for x in answers))
    return tmp_path / "answers.jsonl", tmp_path / "qa50.jsonl"


def _args(answers: Path, questions: Path, url: str, *extra: str) -> list[str]:
    return ["eval", "chat", "--answers", str(answers), "--questions", str(questions), "--judge-url", url,
            "--judge-model", "judge-1", "--backoff", "0", *extra]  # fmt: skip


def test_scores_with_retries(judge: tuple[Judge, str], qa_files: tuple[Path, Path], capsys, caplog) -> None:
    state, url = judge
    state.replies = {
        "What organ is shown?": [(200, "8 6\nAssistant 2 is vaguer.")],
        "Describe the image.": [(500, "overloaded"), (200, "10 5\n...")],
        "What technique was used?": [(429, "slow down"), (200, "**4/10** **5/10**")],
    }
    answers, questions = qa_files
    assert main(_args(answers, questions, url, "--concurrency", "2", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    groups = report["groups"]
    assert list(groups) == [
        "conversation",
        "detailed_description",
        "chest_xray",
        "histology",
        "ct_scan",
        "overall",
    ]
    assert groups["overall"]["relative"] == pytest.approx(100 * (6 / 8 + 5 / 10 + 5 / 4) / 3)
    assert groups["conversation"]["relative"] == pytest.approx(100.0)
    assert groups["chest_xray"] == {"count": 1, "reference_score": 10.0, "model_score": 5.0, "relative": 50.0}
    assert len(state.requests) == 5
    assert state.auth == {f"Bearer {KEY}"}
    first = state.requests[0]
    assert first["model"] == "judge-1" and "<image>" not in first["messages"][-1]["content"]
    assert "As shown in Fig. 1 ." in first["messages"][-1]["content"]
    scores = [json.loads(line) for line in (answers.parent / "answers.scores.jsonl").read_text().splitlines()]
    assert sorted(s["question_id"] for s in scores) == [0, 1, 2]
    assert KEY not in caplog.text


def test_failure_then_resume(judge: tuple[Judge, str], qa_files: tuple[Path, Path], capsys, caplog) -> None:
    state, url = judge
    state.replies = {
        "What organ is shown?": [(200, "8 8")],
        "Describe the image.": [(200, "9 9")],
        "What technique was used?": [(503, "down")],
    }
    answers, questions = qa_files
    out = answers.parent / "scores.jsonl"
    assert main(_args(answers, questions, url, "--out", str(out), "--retries", "1")) == 1
    assert "1 of 3 questions unscored" in caplog.text
    assert len(out.read_text().splitlines()) == 2
    assert len(state.requests) == 4  # 1 + 1 + (1 + 1 retry)

    state.requests.clear()
    state.replies["What technique was used?"] = [(200, "5 10")]
    assert main(_args(answers, questions, url, "--out", str(out))) == 0
    assert len(state.requests) == 1  # only the unscored question is asked again
    assert "overall" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 3


def test_refusal_stops_and_hides_key(judge: tuple[Judge, str], qa_files: tuple[Path, Path], caplog) -> None:
    state, url = judge
    state.replies = {q: [(401, f"Incorrect API key provided: {KEY}")] for q in
                     ("What organ is shown?", "Describe the image.", "What technique was used?")}  # fmt: skip
    answers, questions = qa_files
    assert main(_args(answers, questions, url, "--concurrency", "1")) == 1
    assert "HTTP 401" in caplog.text and KEY not in caplog.text
    assert len(state.requests) < 3  # not retried, and the remaining questions are cancelled


def test_resume_refuses_other_answers(judge: tuple[Judge, str], qa_files: tuple[Path, Path], caplog) -> None:
    state, url = judge
    state.replies = {
        q: [(200, "7 7")] for q in ("What organ is shown?", "Describe the image.", "What technique was used?")
    }
    answers, questions = qa_files
    assert main(_args(answers, questions, url)) == 0
    answers.write_text(answers.read_text().replace("answer 1", "a new answer"))
    assert main(_args(answers, questions, url)) == 1
    assert "scored for a different answer" in caplog.text
