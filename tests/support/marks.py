"""Marks shared by tests: `slow` runs only with UPLIMIT_SLOW=1 (`make test-slow`)."""

from __future__ import annotations

import os

import pytest

__all__ = ["slow"]


def slow(reason: str) -> pytest.MarkDecorator:
    """Skip unless UPLIMIT_SLOW=1: a test or case the suite's 10 minutes cannot hold."""
    return pytest.mark.skipif(
        os.environ.get("UPLIMIT_SLOW") != "1", reason=f"{reason}: run with UPLIMIT_SLOW=1"
    )
