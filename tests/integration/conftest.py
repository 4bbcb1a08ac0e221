"""Fixtures on the real model pair (fetched by `make`, reused across runs)."""

from __future__ import annotations

import pytest

from uplimit.errors import ConfigError


def _load(ref: str, missing) -> object:
    from uplimit.models.loading import load_model

    try:
        return load_model(ref)
    except ConfigError as e:
        missing("real", f"real model pair not available ({e})")


@pytest.fixture(scope="session")
def real_weak(missing):
    model = _load("weak", missing)
    yield model
    model.close()


@pytest.fixture(scope="session")
def real_strong(missing):
    model = _load("strong", missing)
    yield model
    model.close()
