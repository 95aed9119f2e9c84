"""Model cards (README.md with Hub YAML metadata) for merged, exported and pushed models.

The card is built from what the run saved: every stage's ``stage.json`` (losses, steps, wall time,
hardware), the resolved recipe (all stages and hyper-parameters) and, when present, evaluation
score files (``eval/*.json`` next to the model, or files given with ``--eval-json``).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
NOTICE = (
    "**Research use only. Not for clinical use.** This model is intended for research on biomedical "
    "vision-language modelling and for reproducing published results. It is not a medical device, was "
    "not validated for diagnosis, treatment or any clinical decision, and its answers can be wrong or "
    "fabricated. Do not use it in clinical care or for any decision about a patient."
)
TAGS = ["medical", "biomedical", "llava", "llava-med", "vision-language", "qlora", "lora", "qlora-med"]
