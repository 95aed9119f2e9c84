"""``qlora-med serve``: the page renders in headless Chromium with the notice; a question gets the model's answer.

Needs ``gradio`` (skipped without it); the browser checks need Debian's ``chromium``
(``apt-get install -y chromium``) and are skipped without ``/usr/bin/chromium``.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from qlora_med.serve.app import history_rounds

ROOT = Path(__file__).resolve().parents[3]
IMAGES = ROOT / "data" / "sample" / "images"
CHROMIUM = Path(os.environ.get("QLORA_MED_CHROMIUM", "/usr/bin/chromium"))
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason=f"{CHROMIUM} not installed (apt-get install -y chromium)"
)
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def generator(tmp_path_factory, tiny_dir):
    pytest.importorskip("gradio")
    from helpers.trained_run import trained_run  # one tiny trained run per session, shared with merge/export

    from qlora_med.eval.generate import Generator

    return Generator.load(trained_run(tmp_path_factory, tiny_dir))


@pytest.fixture(scope="module")
def server(generator):
    from qlora_med.eval.generate import Sampling
    from qlora_med.serve.app import build_app, launch

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = launch(
        build_app(generator, Sampling(MAX_NEW_TOKENS), IMAGES),
        "127.0.0.1",
        port,
        block=False,
        examples=IMAGES,
    )
    yield f"http://127.0.0.1:{port}/"
    app.close()


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=15000",
    ]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


@needs_chromium
def test_page_renders_with_notice_in_headless_chromium(server, tmp_path):
    from PIL import Image

    shot = tmp_path / "page.png"
    proc = _chromium(tmp_path, "--window-size=1280,900", f"--screenshot={shot}", server)
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    # text, widgets and example thumbnails: not a blank page
    assert colours is not None and len(colours) > 200
    assert max(count for count, _ in colours) < 0.95 * sum(count for count, _ in colours)

    dom = _chromium(tmp_path, "--dump-dom", server).stdout  # the DOM after Gradio's scripts ran
    assert "Research use only. Not for clinical use." in dom
    assert 'id="notice"' in dom and "Example images" in dom


def test_question_gets_the_models_answer_over_the_gradio_api(server, generator):
    from gradio_client import Client, handle_file

    from qlora_med.eval.generate import Sampling

    image = IMAGES / "ihc.png"
    client = Client(server, verbose=False)
    history, box = client.predict("what stain is used?", handle_file(str(image)), [], api_name="/chat")
    assert box == "" and [m["role"] for m in history] == ["user", "assistant"]
    answer = history_rounds(history)[0][1]
    assert answer.strip()
    pixels = generator.pixel_values([image], ["x"])
    expected = generator.generate(
        [generator.prompt_ids([("what stain is used?", None)])], pixels, Sampling(MAX_NEW_TOKENS)
    )
    assert answer == expected[0]

    history, _ = client.predict("and where?", handle_file(str(image)), history, api_name="/chat")
    rounds = history_rounds(history)
    assert [q for q, _ in rounds] == ["what stain is used?", "and where?"]
    ids = generator.prompt_ids([rounds[0], ("and where?", None)])
    assert rounds[1][1] == generator.generate([ids], pixels, Sampling(MAX_NEW_TOKENS))[0]


def test_history_rounds_reads_both_message_shapes():
    history = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": [{"type": "text", "text": "q2"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a2"}]},
        {"role": "user", "content": "unanswered"},
    ]
    assert history_rounds(history) == [("q1", "a1"), ("q2", "a2")]
