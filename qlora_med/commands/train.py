"""``qlora-med train RECIPE --stage NAME [key=value ...]``: one stage of a recipe."""

from __future__ import annotations

import argparse

from qlora_med.commands._options import summarise

NAME = "train"
HELP = "run one stage of a recipe (it starts from the previous stage's final output)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("--stage", required=True, help="stage name, as in the recipe's stages list")
    parser.add_argument("--restart-changed", action="store_true",
                        help="a stage folder trained with other settings: set it aside (<stage>.changed-<time>) "
                        "and train the stage again, instead of refusing")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")


def main(args: argparse.Namespace) -> int:
    from qlora_med.config.loader import load_recipe
    from qlora_med.train.runner import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    summarise(run_recipe(recipe, only=args.stage, restart_changed=args.restart_changed), recipe.output_dir)
    return 0
