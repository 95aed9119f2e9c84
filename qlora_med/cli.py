"""The ``qlora-med`` console script: builds nested sub-commands from ``qlora_med.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from types import ModuleType

from qlora_med import __version__, commands
from qlora_med.errors import QloraMedError, describe_failure
from qlora_med.train.distributed import quiet_non_main_ranks


def _command_modules() -> list[ModuleType]:
    modules = []
    for info in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "NAME"):
            modules.append(module)
    return sorted(modules, key=lambda m: m.NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-med",
        description="QLoRA fine-tuning of LLaVA-style biomedical assistants (research use only).",
    )
    parser.add_argument("--version", action="version", version=f"qlora-med {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(dest="command")}
    for module in _command_modules():
        path = tuple(module.NAME.split())
        for depth in range(1, len(path)):
            prefix = path[:depth]
            if prefix not in groups:
                group = groups[path[: depth - 1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands")
                groups[prefix] = group.add_subparsers(dest=f"command_{depth}")
        sub = groups[path[:-1]].add_parser(path[-1], help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(func=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may follow options: `train R.yaml --stage x a.b=1`
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    quiet_non_main_ranks()
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    log = logging.getLogger("qlora_med")
    try:
        return int(args.func(args) or 0)
    except QloraMedError as err:
        log.error("%s", err)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted (Ctrl-C); a training run resumes from its last checkpoint with the same command")
        return 130
    except Exception as err:  # the one error boundary: one line and a non-zero exit; -v for the traceback
        if args.verbose:
            log.exception("%s", describe_failure(err))
        else:
            log.error("%s", describe_failure(err))
        return 1


if __name__ == "__main__":
    sys.exit(main())
