"""Sampling parameters, the support they leave, and seeded Gumbel-max sampling.

The inner side samples the strong model's token as

    argmax_{i in S} (logits_i / T + g_i),   g: the position's Gumbel noise (coding.noise)

where S is the support left by top-k then top-p (OpenAI/HF order). With Gumbel noise this is
an exact sample of softmax(logits / T) restricted to S. T = 0 means greedy (argmax).
The decoder runs the same functions on the weak model's logits to guess that token.
Every function here is deterministic for a given numpy build: both sides call them.

Compression-aware decoding (opt-in, `tie_nats` and `tilt`; docs/codec.md) changes which token
the inner emits so that the decoder's guess hits more often. The output is then no longer the
strong model's exact output; both knobs at 0 leave `sample` untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from uplimit.coding.noise import PositionNoise
from uplimit.errors import InternalError, InvalidRequest

# Nucleus candidates are first looked for among the tokens within this many units of x = logits/T
# of the top one (a comparison over the vocabulary instead of a partition); the full sort is
# the fallback when they do not hold top_p of the mass.
_NUCLEUS_WINDOW = 20.0
# A strong model's top logits a few nats apart are alternatives it likes almost as much; past
# ~10 nats (a probability ratio of 2e4) "within D nats" would mean "whatever the weak model says".
MAX_TIE_NATS = 10.0
# Below this, logits / T overflow float64 for logits of a few hundred (T = 1e-310 makes every
# score infinite and no table can be built); a temperature this small samples the argmax
# anyway, and T = 0 says so exactly.
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    # Compression-aware decoding (module doc), 0: off. At T = 0 emit the decoder's guess when
    # the strong logit for it is within tie_nats of the strong top logit; at T > 0 sample from
    # p^(1 - tilt) q^tilt, renormalised (p strong, q weak, both after temperature).
    tie_nats: float = 0.0
    tilt: float = 0.0

    def __post_init__(self) -> None:
        if not (
            self.temperature == 0.0
            or (math.isfinite(self.temperature) and MIN_TEMPERATURE <= self.temperature <= 2.0)
        ):
            raise InvalidRequest(
                f"temperature must be 0 or in [{MIN_TEMPERATURE:g}, 2], got {self.temperature}",
                param="temperature",
            )
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise InvalidRequest(
                f"top_k must be a non-negative integer, got {self.top_k}", param="top_k"
            )
        # -0.0 is refused as well: the downlink has one encoding of "off" (`wire.protocol`).
        if not (_non_negative(self.tie_nats) and self.tie_nats <= MAX_TIE_NATS):
            raise InvalidRequest(
                f"tie_nats must be in [0, {MAX_TIE_NATS:g}], got {self.tie_nats}", param="tie_nats"
            )
        if self.tie_nats and not self.greedy:
            raise InvalidRequest("tie_nats applies only at temperature 0", param="tie_nats")
        if not (_non_negative(self.tilt) and self.tilt <= 1.0):
            raise InvalidRequest(f"tilt must be in [0, 1], got {self.tilt}", param="tilt")
        if self.tilt and self.greedy:
            raise InvalidRequest("tilt applies only at temperature > 0", param="tilt")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def guided(self) -> bool:
        """A knob is on: the emitted token depends on the weak model too (`guided_sample`)."""
        return bool(self.tie_nats or self.tilt)

    @property
    def knob(self) -> float:
        """The compression knob this temperature allows: tie_nats at T = 0, tilt at T > 0."""
        return self.tie_nats if self.greedy else self.tilt


def knob_name(greedy: bool) -> str:
    """The compression knob's name: tie_nats at T = 0, tilt at T > 0 (`SamplingParams.knob`)."""
    return "tie_nats" if greedy else "tilt"


def _non_negative(x: float) -> bool:
    """Finite, >= 0, and not -0.0."""
    return math.isfinite(x) and x >= 0.0 and math.copysign(1.0, x) > 0.0


def support(
    logits: npt.NDArray[np.floating], params: SamplingParams
) -> npt.NDArray[np.int64] | None:
    """Token ids that top-k and top-p leave, most probable first (ties: lower id first);
    None when they leave the whole vocabulary."""
    n = logits.size
    k = params.top_k if 0 < params.top_k < n else n
    if params.top_p >= 1.0 and k == n:
        return None
    x = logits.astype(np.float64) / params.temperature
    top = x.max()
    window = np.flatnonzero(x > top - _NUCLEUS_WINDOW)
    if params.top_p >= 1.0:
        pool = window if window.size >= k else np.arange(n)
        return _by_probability(x, pool)[:k]
    probs = np.exp(x - top)
    probs /= probs.sum()
    for pool in (window, np.arange(n)):
        cand = _by_probability(probs, pool)[:k]
        cum = np.cumsum(probs[cand])
        cut = int(np.searchsorted(cum, params.top_p)) + 1  # smallest prefix reaching top_p
        if cut <= cand.size:
            return cand[:cut]
        if cand.size == k:  # top-k binds before top_p is reached
            return cand
    return cand  # rounding left the whole vocabulary just short of top_p


def _by_probability(score: npt.NDArray[np.float64], pool: npt.NDArray[np.int64]):
    """`pool` (ascending ids) sorted by descending score; the stable sort breaks ties by id."""
    return pool[np.argsort(-score[pool], kind="stable")].astype(np.int64)


def sample(
    logits: npt.NDArray[np.floating], params: SamplingParams, noise: PositionNoise | None
) -> int:
    """The token the inner side emits: greedy for T = 0, else seeded Gumbel-max over the support."""
    if params.greedy:
        return int(np.argmax(logits))
    if noise is None:
        raise InternalError("sampling at T > 0 needs the position's noise")
    x = logits.astype(np.float64) / params.temperature
    winner, _, _ = noise.perturbed_argmax(x, support(logits, params))
    return winner


def guided_sample(
    strong_logits: npt.NDArray[np.floating],
    weak_logits: npt.NDArray[np.floating] | None,
    params: SamplingParams,
    noise: PositionNoise | None,
) -> int:
    """The token the inner emits with the knobs on (`sample` when both are 0).

    `weak_logits` must be the decoder's at this position (the weak model on the prompt and the
    uploaded tokens) and `noise` the position's: then `sample(weak_logits, ...)` is exactly
    the decoder's guess (`coding.codec.predict`), so tie_nats emits that guess, and tilt = 1
    emits it too. tilt mixes logits, (1 - L) l_s + L l_w, which is p^(1-L) q^L after
    dividing by T; top-k and top-p then apply to the mixture, and the same Gumbel noise
    samples it, so the guess still agrees as often as the two distributions allow.
    `weak_logits` may be None only when both knobs are 0.
    """
    if not params.guided:
        return sample(strong_logits, params, noise)
    if weak_logits is None:
        raise InternalError("tie_nats and tilt need the weak model's logits")
    if params.tilt:  # at tilt 1 the mixture is the weak logits exactly (0 * finite = 0)
        mixed = (1.0 - params.tilt) * strong_logits.astype(np.float64)
        mixed += params.tilt * weak_logits.astype(np.float64)
        return sample(mixed, params, noise)
    token = sample(strong_logits, params, noise)
    if params.tie_nats:
        guess = sample(weak_logits, params, noise)
        if float(strong_logits[token]) - float(strong_logits[guess]) <= params.tie_nats:
            return guess
    return token
