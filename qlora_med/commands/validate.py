"""``qlora-med validate RECIPE``: check a recipe (keys, types, values, combinations, files) without loading a model.

Every problem is reported at once; ``--no-files`` skips only the checks that files and folders exist. Each model
is logged with its kind, read from its config.json: a local folder's, or a Hub model's (that one file is fetched
into the HF cache; ``HF_HUB_OFFLINE=1``: from the cache only).
"""

from __future__ import annotations

import argparse
import logging

NAME = "validate"
HELP = "check a recipe's keys, types, files and combinations without loading any model"
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    parser.add_argument("--no-files", action="store_true", help="skip checks that files and folders exist")


def main(args: argparse.Namespace) -> int:
    from qlora_med.config.files import validate_paths
    from qlora_med.config.loader import load_recipe
    from qlora_med.model.source import hub_file  # huggingface_hub only, no torch

    recipe = load_recipe(args.recipe, args.overrides)
    if not args.no_files:
        for source in validate_paths(recipe, hub_config=hub_file):
            logger.info("%s", source)
    for stage in recipe.stages:
        logger.info("%s: %-8s template=%s train=%s lr=%g projector_lr=%g", stage.name, stage.kind, stage.template,
                    stage.train, stage.learning_rate, stage.projector_lr)
    logger.info("%s: valid", args.recipe)
    return 0
