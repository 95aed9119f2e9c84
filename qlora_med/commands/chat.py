"""``qlora-med chat``: multi-turn terminal chat about an image, answers streamed token by token."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora_med.commands._options import add_generation_arguments
from qlora_med.errors import QloraMedError
from qlora_med.serve.terminal import COMMANDS, ChatSession, chat_loop

NAME = "chat"
HELP = "chat with a trained model about an image in the terminal (research use only)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="run dir, stage final/, checkpoint-N/ or merged model")
    parser.add_argument("--image", type=Path, help="image to talk about (or load one later with /image PATH)")
    add_generation_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from qlora_med.eval.generate import Generator, Sampling
    from qlora_med.notices import NOTICE

    try:
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p)
    except ValueError as err:
        raise QloraMedError(str(err)) from None
    out = sys.stdout
    out.write(NOTICE.replace("**", "") + "\n")
    session = ChatSession(Generator.load(args.model, args.dtype), sampling)
    if args.image is not None:
        session.set_image(args.image)
    out.write(f"\nModel: {args.model}. Image: {session.image or 'none'}. Commands: {COMMANDS}\n")
    try:
        chat_loop(session, sys.stdin, out)
    except KeyboardInterrupt:
        out.write("\n")
    return 0
