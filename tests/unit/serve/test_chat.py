"""``qlora-med chat`` driven headless: stdin lines in, streamed replies out, history in the next prompt."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from qlora_med.cli import main as cli
from qlora_med.eval.generate import Generator, Sampling
from qlora_med.serve.terminal import ChatSession, chat_loop

ROOT = Path(__file__).resolve().parents[3]
IMAGES = ROOT / "data" / "sample" / "images"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir) -> Path:
    from helpers.trained_run import trained_run  # one tiny trained run per session, shared with merge/export

    return trained_run(tmp_path_factory, tiny_dir)


def test_chat_cli_streams_replies_and_keeps_history(run_dir, monkeypatch, capsys, caplog):
    stdin = "what stain is used?\nwhere is it brown?\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    caplog.set_level(logging.DEBUG, logger="qlora_med.serve.terminal")
    args = ["chat", "--model", str(run_dir), "--image", str(IMAGES / "ihc.png"), "--max-new-tokens", "8"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("Research use only. Not for clinical use.")
    replies = [line.split("model> ", 1)[1] for line in out.splitlines() if "model> " in line]
    assert len(replies) == 2 and replies[0].strip()
    prompts = [r.message for r in caplog.records if r.message.startswith("prompt (")]
    assert len(prompts) == 2
    # The second prompt carries the first round: question, the streamed answer, then the new question.
    assert "what stain is used?" in prompts[1] and replies[0].strip() in prompts[1]
    assert prompts[1].count("[INST]") == 2 and prompts[1].count("<image>") == 1


def test_chat_commands(run_dir):
    generator = Generator.load(run_dir)
    session = ChatSession(generator, Sampling(max_new_tokens=6))
    stdin = io.StringIO(
        "hello\n/image nowhere.png\n/help\n"
        f"/image {IMAGES / 'cell.png'}\nhow many cells?\nand now?\n/reset\nagain?\n"
    )
    stdout = io.StringIO()
    chat_loop(session, stdin, stdout)  # ends at end of input
    text = stdout.getvalue()
    assert "no image yet" in text and "cannot use that image" in text and "unknown command" in text
    assert "(image:" in text and "(conversation cleared)" in text
    assert len(session.history) == 1 and session.history[0][0] == "again?"
    streamed = "".join(session.ask("one more?"))
    assert session.history[-1] == ("one more?", streamed.strip())
    # the streamed answer is the batch generator's greedy answer for the same prompt
    ids = generator.prompt_ids([("again?", session.history[0][1]), ("one more?", None)])
    assert generator.generate([ids], session.pixels, session.sampling) == [streamed.strip()]
