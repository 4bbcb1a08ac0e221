"""Fixtures on the real model pair (fetched by `make`, reused across runs)."""

from __future__ import annotations

import os

import pytest

from uplimit.errors import ConfigError


def _load(ref: str, **options: object):
    from uplimit.models.loading import load_model

    try:
        return load_model(ref, **options)
    except ConfigError as e:
        if os.environ.get("UPLIMIT_REQUIRE_REAL") == "1":
            raise  # `make test` fetched the pair: a missing model is a failure there
        pytest.skip(f"real model pair not available ({e})")


@pytest.fixture(scope="session")
def real_weak():
    model = _load("weak")
    yield model
    model.close()


@pytest.fixture(scope="session")
def real_strong():
    model = _load("strong")
    yield model
    model.close()
