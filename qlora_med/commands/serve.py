"""``qlora-med serve``: a local web page (Gradio) for chatting with a trained model about an image."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qlora_med.commands._options import add_generation_arguments
from qlora_med.errors import QloraMedError

NAME = "serve"
HELP = "serve a web chat page for a trained model (Gradio; research use only)"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="run dir, stage final/, checkpoint-N/ or merged model")
    parser.add_argument("--port", type=int, default=7860, help="TCP port")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)"
    )
    parser.add_argument(
        "--examples", type=Path, help="folder of example images (default: data/sample/images)"
    )
    add_generation_arguments(parser)


def main(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise QloraMedError("qlora-med serve needs Gradio: pip install gradio") from None
    from qlora_med.eval.generate import Generator, Sampling
    from qlora_med.serve.app import DEFAULT_EXAMPLES, build_app, launch

    try:
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p)
    except ValueError as err:
        raise QloraMedError(str(err)) from None
    examples = args.examples or DEFAULT_EXAMPLES
    app = build_app(Generator.load(args.model, args.dtype), sampling, examples)
    logger.info("serving %s on http://%s:%d (Ctrl-C stops)", args.model, args.host, args.port)
    launch(app, args.host, args.port, block=True, examples=examples)
    return 0
