"""The outer's own receive budget comes from the config, never unlimited."""

from __future__ import annotations

import pytest

from uplimit.config import load_config
from uplimit.errors import ConfigError
from uplimit.models.store import STRONG
from uplimit.outer.serve import receive_budget_bytes


def test_the_outer_budget_is_the_configs_or_one_percent_of_the_pinned_strong_model() -> None:
    assert receive_budget_bytes(load_config(env={})) == STRONG.size // 100 == 11_173_207
    given = {"UPLIMIT_LINK_LIFETIME_BUDGET_BYTES": "5000", "UPLIMIT_MODELS_STRONG": "/m.gguf"}
    assert receive_budget_bytes(load_config(env=given)) == 5000


def test_an_outer_that_cannot_know_the_default_refuses_to_guess() -> None:
    with pytest.raises(ConfigError, match="set lifetime_budget_bytes"):
        receive_budget_bytes(load_config(env={"UPLIMIT_MODELS_STRONG": "/m.gguf"}))
