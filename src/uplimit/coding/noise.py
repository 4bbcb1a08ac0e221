"""Per-position random numbers that both sides derive from the outer side's seed.

A counter-based generator: the uniform for token `i` at generated position `t` of a stream
with seed `s` is a pure function u(s, t, i), computed with 64-bit integer mixing
(SplitMix64's finaliser; Steele, Lea & Flood 2014), so any token's number can be drawn
without drawing the others, and both sides get the same bits.

From the uniforms come Gumbel variates g = -log(-log u): argmax(logits / T + g) is an exact
sample of softmax(logits / T) (the Gumbel-max trick). The inner side samples the strong
model that way; the decoder adds the same g to the weak model's logits to guess the token.
The Gumbel transform uses numpy's float64 log: encoder and decoder must run the same numpy
build on the same kind of CPU (the codec fingerprint records both).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1
_TWO_POW_53 = float(1 << 53)


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64 finaliser: a bijection on 64-bit words with full avalanche."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _mix_int(x: int) -> int:
    """`_mix` on a Python int (used to derive per-position keys without numpy scalars)."""
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
    return _mix_int(_mix_int(seed) ^ ((position + 1) * 0x9E3779B97F4A7C15))


def uniforms(seed: int, position: int, tokens: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """u(seed, position, token) in the open interval (0, 1), one per entry of `tokens`."""
    key = np.uint64(position_key(seed, position))
    with np.errstate(over="ignore"):
        bits = _mix(key + (tokens.astype(np.uint64) + np.uint64(1)) * _GOLDEN)
    # top 53 bits + 1/2: never exactly 0 or 1, so both logs below are finite
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / _TWO_POW_53


def gumbel(seed: int, position: int, n_vocab: int) -> npt.NDArray[np.float64]:
    """Gumbel(0, 1) noise for every token of the vocabulary at one position."""
    u = uniforms(seed, position, np.arange(n_vocab, dtype=np.int64))
    return -np.log(-np.log(u))
