"""Best-of-N scoring: how the inner picks one of a stream's candidates to upload.

A scorer sees a finished candidate's tokens, uploaded tokens and the strong model's
log-probabilities; the highest score wins (`[inner] scorer` names one of `SCORERS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

__all__ = ["SCORERS", "Candidate", "Scorer", "mean_logprob", "sum_logprob"]


class Candidate(Protocol):
    """What a scorer sees of a finished candidate."""

    tokens: list[int]  # everything generated, reasoning included
    uploaded: list[int]  # what would be uploaded
    logprobs: list[float]  # the strong model's log-probability (T = 1) of each token


Scorer = Callable[[Candidate], float]


def mean_logprob(c: Candidate) -> float:
    """The default scorer: mean strong log-probability per generated token."""
    return sum(c.logprobs) / len(c.logprobs) if c.logprobs else -math.inf


def sum_logprob(c: Candidate) -> float:
    return sum(c.logprobs)


SCORERS: dict[str, Scorer] = {"mean_logprob": mean_logprob, "sum_logprob": sum_logprob}
