"""Terminal chat about an image: a session keeping the conversation, and the read-eval loop with /image, /reset, /quit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TextIO

from qlora_med.errors import DataError, QloraMedError

COMMANDS = "/image PATH (new image, new conversation), /reset (forget the conversation), /quit"

logger = logging.getLogger(__name__)


class ChatSession:
    """One conversation about one image: the history of (question, answer) rounds."""

    def __init__(self, generator, sampling) -> None:
        self.generator, self.sampling = generator, sampling
        self.image: Path | None = None
        self.pixels = None
        self.history: list[tuple[str, str]] = []
        self.last_prompt = ""  # the rendered text of the last prompt (for inspection and tests)

    def set_image(self, path: Path) -> None:
        """Switch to a new image (preprocessed now, so a bad path fails here) and start over."""
        self.pixels = self.generator.pixel_values([path], ["chat"])
        self.image = path
        self.reset()

    def reset(self) -> None:
        self.history = []

    def ask(self, question: str):
        """Stream the answer to ``question``; the round joins the history once the answer is complete."""
        if self.pixels is None:
            raise QloraMedError("no image loaded: use /image PATH first")
        ids, rounds = self.generator.chat_prompt(self.history, question, self.sampling.max_new_tokens)
        self.last_prompt = self.generator.render(rounds).text
        logger.debug("prompt (%d tokens): %r", len(ids), self.last_prompt)
        parts = []
        for chunk in self.generator.stream(ids, self.pixels, self.sampling):
            parts.append(chunk)
            yield chunk
        kept = [(q, a) for q, a in rounds[:-1] if a is not None]  # what still fits the context
        self.history = [*kept, (rounds[-1][0], "".join(parts).strip())]


def _read_line(stdin: TextIO, stdout: TextIO) -> str:
    """One input line ('' at end of input); line editing and history when typing in a terminal."""
    if stdin.isatty():
        import readline  # noqa: F401  (gives input() editing and history)

        try:
            return input("\nyou> ") + "\n"
        except EOFError:
            return ""
    stdout.write("\nyou> ")
    stdout.flush()
    return stdin.readline()


def chat_loop(session: ChatSession, stdin: TextIO, stdout: TextIO) -> None:
    """Read questions and commands from ``stdin`` until /quit or end of input; write answers to ``stdout``."""
    while True:
        line = _read_line(stdin, stdout)
        if not line:
            stdout.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            session.reset()
            stdout.write("(conversation cleared)\n")
            continue
        if line.startswith("/image"):
            path = Path(line[len("/image") :].strip()).expanduser()
            try:
                session.set_image(path)
            except DataError as err:
                stdout.write(f"(cannot use that image: {err})\n")
                continue
            stdout.write(f"(image: {path}; new conversation)\n")
            continue
        if line.startswith("/"):
            stdout.write(f"(unknown command; commands: {COMMANDS})\n")
            continue
        if session.pixels is None:
            stdout.write("(no image yet: load one with /image PATH)\n")
            continue
        stdout.write("model> ")
        for chunk in session.ask(line):
            stdout.write(chunk)
            stdout.flush()
        stdout.write("\n")
