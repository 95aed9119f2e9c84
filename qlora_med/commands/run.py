"""``qlora-med run RECIPE [key=value ...]``: every stage of a recipe, in order."""

from __future__ import annotations

import argparse

from qlora_med.commands._options import summarise

NAME = "run"
HELP = "run every stage of a recipe in order (finished stages are skipped, unfinished ones resume)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("--restart-changed", action="store_true",
                        help="a stage folder trained with other settings: set it aside (<stage>.changed-<time>) "
                        "and train the stage again, instead of refusing")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. stages.align.max_steps=10")


def main(args: argparse.Namespace) -> int:
    from qlora_med.config.loader import load_recipe
    from qlora_med.train.runner import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    summarise(run_recipe(recipe, restart_changed=args.restart_changed), recipe.output_dir)
    return 0
