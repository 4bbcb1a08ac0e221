"""Per-position random numbers that both sides derive from the outer side's seed.

Every token i at generated position t of a stream with seed s has a uniform u(s, t, i) in
(0, 1) and a Gumbel variate g = -log(-log u). argmax_i(x_i + g_i), with x = logits / T, is an
exact sample of softmax(x) (the Gumbel-max trick). The inner side samples the strong model
that way; the decoder adds the same g to the weak model's x to guess the token.

Computing g for all 152k tokens costs milliseconds per token, more than a model step is
worth. So the uniforms are built so that the argmax needs g for a few hundred tokens only:
- Each token is "lucky" independently with probability 1 - TAU, where TAU = exp(-e**-5):
  the lucky set of a position is a Bernoulli process, drawn as geometric gaps.
- A lucky token's u is uniform in (TAU, 1), an unlucky one's uniform in (0, TAU], from a
  counter-based hash of (s, t, i) (SplitMix64's finaliser; Steele, Lea & Flood 2014). So
  u is exactly uniform on (0, 1) and independent across tokens, as Gumbel-max needs.
- An unlucky token has g <= 5. If a is the argmax of x and B = x_a + g_a, a token can beat
  B only if it is lucky (about 1,000 tokens) or x_i > B - 5 (usually a handful).
Both sides run these same functions, in float64; the logs are numpy's, so encoder and
decoder must run the same numpy build on the same kind of CPU (the codec fingerprint
records both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

LUCKY_GAP = 5.0  # an unlucky token's Gumbel variate is at most this
TAU = math.exp(-math.exp(-LUCKY_GAP))  # P(unlucky)
_LOG_TAU = math.log(TAU)  # log P(a gap continues), for the geometric gaps
EULER_GAMMA = 0.5772156649015329  # E[g]: the noise assumed for tokens whose g is not drawn

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_TWO_POW_53 = float(1 << 53)
_GAPS_STREAM = 1 << 62  # counter offset that keeps the gap draws apart from token draws


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64 finaliser: a bijection on 64-bit words with full avalanche."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _mix_int(x: int) -> int:
    """`_mix` on a Python int (for keys, without numpy scalar overflow warnings)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_key(seed: int, position: int) -> int:
    """The 64-bit key of one (seed, position); distinct positions give unrelated streams."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    return _mix_int(_mix_int(seed) ^ ((position + 1) * _GOLDEN))


def _hash_uniforms(key: int, counters: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Uniforms in the open interval (0, 1), one per counter, from the top 53 hash bits."""
    with np.errstate(over="ignore"):
        bits = _mix(
            np.uint64(key) + (counters.astype(np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN)
        )
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / _TWO_POW_53


@dataclass(frozen=True)
class PositionNoise:
    """The Gumbel noise of one (seed, position), drawn lazily for any tokens."""

    key: int
    n_vocab: int
    lucky: npt.NDArray[np.int64]  # sorted ids of the tokens with u > TAU

    @classmethod
    def draw(cls, seed: int, position: int, n_vocab: int) -> PositionNoise:
        key = position_key(seed, position)
        # Gaps between lucky tokens are geometric: floor(log v / log TAU) unlucky ones.
        expected = n_vocab * (1 - TAU)
        lucky: list[npt.NDArray[np.int64]] = []
        start, batch = 0, int(expected + 6 * math.sqrt(expected) + 16)
        while True:
            v = _hash_uniforms(key, np.arange(start, start + batch) + _GAPS_STREAM)
            gaps = np.floor(np.log(v) / _LOG_TAU).astype(np.int64)
            ids = np.cumsum(gaps + 1) - 1 + (int(lucky[-1][-1]) + 1 if lucky else 0)
            lucky.append(ids)
            if ids[-1] >= n_vocab:
                break
            start += batch
        ids = np.concatenate(lucky)
        return cls(key, n_vocab, ids[ids < n_vocab])

    def uniforms(self, tokens: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        v = _hash_uniforms(self.key, tokens)
        return np.where(self.is_lucky(tokens), TAU + (1.0 - TAU) * v, TAU * v)

    def is_lucky(self, tokens: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        return _contains(self.lucky, tokens)

    def gumbel(self, tokens: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """g = -log(-log u) for the given token ids."""
        return -np.log(-np.log(self.uniforms(tokens)))

    def perturbed_argmax(
        self, x: npt.NDArray[np.float64], allowed: npt.NDArray[np.int64] | None = None
    ) -> tuple[int, npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """argmax over `allowed` (default: all) of x + g, exactly.

        Returns (winner, candidates, their g): every token that could have won, with its noise.
        """
        if allowed is None:
            top = int(np.argmax(x))
            bound = x[top] + self.gumbel(np.array([top]))[0] - LUCKY_GAP
            near = np.flatnonzero(x > bound)
            lucky = self.lucky
        else:
            xa = x[allowed]
            top = int(allowed[np.argmax(xa)])
            bound = x[top] + self.gumbel(np.array([top]))[0] - LUCKY_GAP
            near = np.sort(allowed[xa > bound])
            lucky = self.lucky[_contains(np.sort(allowed), self.lucky)]
        candidates = np.union1d(near, lucky)
        g = self.gumbel(candidates)
        winner = int(candidates[np.argmax(x[candidates] + g)])
        return winner, candidates, g


def _contains(
    sorted_ids: npt.NDArray[np.int64], ids: npt.NDArray[np.int64]
) -> npt.NDArray[np.bool_]:
    """Which of `ids` are in `sorted_ids`."""
    if sorted_ids.size == 0:
        return np.zeros(ids.shape, dtype=np.bool_)
    at = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    return sorted_ids[at] == ids
