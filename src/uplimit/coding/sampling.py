"""Sampling parameters, the support they leave, and seeded Gumbel-max sampling.

The inner side samples the strong model's token as

    argmax_{i in S} (logits_i / T + g_i),   g = noise.gumbel(seed, position)

where S is the support left by top-k then top-p (OpenAI/HF order). With Gumbel noise this is
an exact sample of softmax(logits / T) restricted to S. T = 0 means greedy (argmax).
The decoder runs the same functions on the weak model's logits to guess that token.
Every function here is deterministic for a given numpy build: both sides call them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from uplimit.errors import ConfigError

# Nucleus candidates are first looked for among this many most probable tokens; a full sort
# of a 152k vocabulary costs ~10 ms, a partition ~1 ms. Falls back to the full sort.
_NUCLEUS_PREFIX = 1024


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0):
            raise ConfigError(f"temperature must be in [0, 2], got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ConfigError(f"top_k must be a non-negative integer, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def support(logits: npt.NDArray[np.floating], params: SamplingParams) -> npt.NDArray[np.int64]:
    """Token ids that top-k and top-p leave, most probable first (ties: lower id first)."""
    scaled = logits.astype(np.float64) / params.temperature
    n = scaled.size
    k = params.top_k if 0 < params.top_k < n else n
    if params.top_p >= 1.0 and k == n:
        return np.arange(n, dtype=np.int64)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    prefix = min(k, _NUCLEUS_PREFIX) if params.top_p < 1.0 else k
    while True:
        cand = _top(probs, prefix)
        if params.top_p >= 1.0:
            return cand
        cum = np.cumsum(probs[cand])
        cut = int(np.searchsorted(cum, params.top_p)) + 1  # smallest prefix reaching top_p
        if cut <= cand.size:
            return cand[:cut]
        if prefix == k:  # rounding left the sum just short of top_p: keep everything
            return cand
        prefix = k  # the prefix was too short: sort everything top-k allows


def _top(probs: npt.NDArray[np.float64], m: int) -> npt.NDArray[np.int64]:
    """The m most probable ids, sorted by descending probability then ascending id."""
    ids = np.arange(probs.size) if m >= probs.size else np.argpartition(-probs, m - 1)[:m]
    ids = np.sort(ids)  # so that the stable sort below breaks ties by id
    return ids[np.argsort(-probs[ids], kind="stable")].astype(np.int64)


def perturbed_scores(
    logits: npt.NDArray[np.floating], params: SamplingParams, noise: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """logits / T + g over the whole vocabulary (the support is applied by the caller)."""
    return logits.astype(np.float64) / params.temperature + noise


def sample(
    logits: npt.NDArray[np.floating],
    params: SamplingParams,
    noise: npt.NDArray[np.float64] | None,
) -> int:
    """The token the inner side emits: greedy for T = 0, else seeded Gumbel-max over the support."""
    if params.greedy:
        return int(np.argmax(logits))
    if noise is None:
        raise ConfigError("sampling at T > 0 needs the position's noise")
    allowed = support(logits, params)
    scores = perturbed_scores(logits, params, noise)
    return int(allowed[np.argmax(scores[allowed])])
