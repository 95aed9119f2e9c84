"""The research-use notice and Hub tags every card, chat and page carries (LLaVA-Med data and models: research only)."""

from __future__ import annotations

NOTICE = (
    "**Research use only. Not for clinical use.** This model is intended for research on biomedical "
    "vision-language modelling and for reproducing published results. It is not a medical device, was "
    "not validated for diagnosis, treatment or any clinical decision, and its answers can be wrong or "
    "fabricated. Do not use it in clinical care or for any decision about a patient."
)
TAGS = ["medical", "biomedical", "llava", "llava-med", "vision-language", "qlora", "lora", "qlora-med"]
