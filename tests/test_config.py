"""Training configuration (trainer/config.py): every range check and choice check gives its message.

Each check is tried just outside its range (which must fail, naming the flag and the value) and on its
boundaries (which must pass, so a check cannot silently be tighter than documented); every recipe must be a
valid config; the CLI reports a bad value with exit status 2. Unit tests; no data set needed.
Run: `pytest tests/test_config.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest

import trainer.fit as fit
from trainer.config import CHOICES, RECIPES, TrainConfig, allowed_range

# flag: (values out of range, values on the boundaries of the allowed range)
RANGES: dict[str, tuple[list, list]] = {
    "epochs": ([0.0, -1.0], [0.01]),
    "batch-size": ([0, -8], [1]),
    "lr": ([0.0, -0.1], [1e-9]),
    "val-size": ([-1], [0]),
    "train-subset": ([-1], [0]),
    "warmup": ([-0.01, 1.0], [0.0, 0.99]),
    "label-smoothing": ([-0.1, 1.0], [0.0, 0.99]),
    "ema-decay": ([-0.1, 1.0], [0.0, 0.999]),
    "translate": ([-1, 9], [0, 8]),
    "cutout": ([-1, 33], [0, 32]),
    "tta": ([-1, 3], [0, 1, 2]),
    "threads": ([-1], [0]),
}
OUT_OF_RANGE = [(flag, value) for flag, (bad, _) in RANGES.items() for value in bad]
IN_RANGE = [(flag, value) for flag, (_, good) in RANGES.items() for value in good]


def _field(flag: str) -> str:
    return flag.replace("-", "_")


@pytest.mark.parametrize(("flag", "value"), OUT_OF_RANGE)
def test_train_config_rejects_an_out_of_range_value_naming_flag_value_and_range(flag: str, value) -> None:
    rule = allowed_range(next(f for f in dataclasses.fields(TrainConfig) if f.name == _field(flag)))
    message = f"--{flag} {value!r} is out of range: it must be {rule}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TrainConfig(**{_field(flag): value})


@pytest.mark.parametrize(("flag", "value"), IN_RANGE)
def test_train_config_accepts_the_boundaries_of_each_range(flag: str, value) -> None:
    assert getattr(TrainConfig(**{_field(flag): value}), _field(flag)) == value


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_train_config_rejects_an_unknown_choice_listing_the_allowed_ones(name: str) -> None:
    message = f"--{name} 'nope' is not one of: {', '.join(CHOICES[name])}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TrainConfig(**{name: "nope"})
    for allowed in CHOICES[name]:
        assert getattr(TrainConfig(**{name: allowed}), name) == allowed


@pytest.mark.parametrize("model", sorted(RECIPES))
def test_train_config_every_recipe_is_valid(model: str) -> None:
    config = TrainConfig(**{**RECIPES[model], "model": model})
    assert config.model == model


def test_fit_main_reports_an_out_of_range_flag_with_exit_status_2(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="trainer.fit"):
        assert fit.main(["--warmup", "1.5", "--out", "never-written"]) == 2
    assert "--warmup 1.5 is out of range: it must be at least 0 and less than 1" in caplog.text, caplog.text
