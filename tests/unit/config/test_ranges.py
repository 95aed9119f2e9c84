"""Numeric ranges are part of validation: a negative or NaN learning rate never reaches the optimizer."""

from __future__ import annotations

import pytest

from qlora_med.config.schema import DataConfig, StageConfig
from qlora_med.errors import ConfigError


def stage(**kw) -> StageConfig:
    return StageConfig(name="align", kind="align", data=[DataConfig(path="d.json", image_folder="img")], **kw)


@pytest.mark.parametrize(
    ("key", "value"),
    [("learning_rate", -1e-4), ("learning_rate", float("nan")), ("projector_lr", 0.0), ("num_epochs", float("inf")),
     ("max_grad_norm", -1.0)],
)
def test_rates_must_be_positive_and_finite(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"stages.align.{key} must be a positive finite number"):
        stage(**{key: value})
