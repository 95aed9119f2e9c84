"""``qlora-med run RECIPE [key=value ...]``: every stage of a recipe, in order."""

from __future__ import annotations

import argparse
import logging

NAME = "run"
HELP = "run every stage of a recipe in order (finished stages are skipped, unfinished ones resume)"
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. stages.align.max_steps=10")


def summarise(results: list[dict], output_dir: str) -> None:
    for info in results:
        logger.info("%-10s loss %s -> %s  steps %s  (%s s)", info["stage"], _fmt(info["loss_first"]),
                    _fmt(info["loss_last"]), info["steps"], info["wall_time_s"])
    logger.info("artefacts: %s/<stage>/final (adapter, projector, processor, stage.json, loss.png)", output_dir)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main(args: argparse.Namespace) -> int:
    from qlora_med.config import load_recipe
    from qlora_med.runner import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    summarise(run_recipe(recipe), recipe.output_dir)
    return 0
