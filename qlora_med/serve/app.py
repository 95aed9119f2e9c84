"""A Gradio page for talking to a trained model about an image (research use only).

Gradio is imported only here and only when the page is built, so the rest of the package never
needs it (``pip install gradio``). The chat handler is stateless: the conversation comes back from
the browser with each question, so several people can use one server; generation runs one request
at a time (the queue's concurrency limit is 1). No request leaves the machine: the theme uses
system fonts and Gradio's analytics are turned off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlora_med.errors import DataError, QloraMedError
from qlora_med.eval.generate import Generator, Sampling

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "sample" / "images"
TITLE = "qlora-med: biomedical visual chat (research use only)"


def _text(content: Any) -> str:
    """Text of a chat message's content: a string or a list of typed parts (Gradio 5/6 shapes)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", "")) if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return ""


def history_rounds(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(question, answer) rounds from a Gradio messages history (unanswered questions dropped)."""
    rounds: list[tuple[str, str]] = []
    question: str | None = None
    for message in history:
        if message.get("role") == "user":
            question = _text(message.get("content"))
        elif message.get("role") == "assistant" and question is not None:
            rounds.append((question, _text(message.get("content"))))
            question = None
    return rounds


def example_images(folder: Path | None) -> list[str]:
    """Image files in ``folder`` (sorted), for the page's examples."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def build_app(generator: Generator, sampling: Sampling, examples: Path | None = DEFAULT_EXAMPLES):
    """The ``gradio.Blocks`` page; its chat handler is also the API endpoint ``/chat``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from qlora_med.notices import NOTICE

    def respond(question: str, image: str | None, history: list[dict[str, Any]] | None) -> Iterator:
        history = list(history or [])
        question = (question or "").strip()
        if not question:
            yield history, ""
            return
        if not image:
            raise gr.Error("Upload an image (or pick an example) first.")
        try:
            pixels = generator.pixel_values([Path(image)], ["upload"])
        except DataError as err:
            raise gr.Error(f"Cannot read that image: {err}") from None
        ids, _ = generator.chat_prompt(history_rounds(history), question, sampling.max_new_tokens)
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        answer = ""
        for chunk in generator.stream(ids, pixels, sampling):
            answer += chunk
            history[-1] = {"role": "assistant", "content": answer}
            yield history, ""
        history[-1] = {"role": "assistant", "content": answer.strip()}
        yield history, ""

    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"## {TITLE}\n\n{NOTICE}", elem_id="notice")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=320)
                if files := example_images(examples):
                    gr.Examples(examples=[[f] for f in files], inputs=[image], label="Example images")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Conversation", height=420)
                question = gr.Textbox(label="Question", placeholder="Ask about the image and press Enter")
                with gr.Row():
                    send = gr.Button("Send", variant="primary")
                    clear = gr.Button("New conversation")
        question.submit(respond, [question, image, chatbot], [chatbot, question], api_name="chat")
        send.click(respond, [question, image, chatbot], [chatbot, question], api_name=False)
        clear.click(lambda: [], None, chatbot, api_name=False)
        image.change(lambda: [], None, chatbot, api_name=False)  # a new image starts a new conversation
    app.queue(default_concurrency_limit=1)
    return app


def launch(app, host: str = "127.0.0.1", port: int = 7860, block: bool = True, examples: Path | None = None):
    """Start the server (``block=False`` returns at once; close with ``app.close()``)."""
    import gradio as gr

    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this address can use the model", host)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    try:
        app.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=not block,
            share=False,
            quiet=True,
            show_error=True,
            theme=theme,
            allowed_paths=[str(examples)] if examples else None,
        )
    except OSError as err:
        raise QloraMedError(f"cannot serve on {host}:{port} ({err}); pick another --port") from None
    return app
