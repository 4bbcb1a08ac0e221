"""Next-token logits -> an exact integer frequency table for the arithmetic coder.

Encoder and decoder each turn the weak model's logits into counts; if one count differs,
decoding derails. So the table is a pure function of the logit *values* (not of dtype,
byte order or memory layout), computed with one defined float step and integers after it:

1. `a = float64(logits)`: exact for float16/32/64 input. Masked symbols become -inf
   (whatever they held). `m = max(a)` (exact); if every unmasked logit is -inf, they all
   become 0 instead (a uniform table).
2. The single float step, in float64 with IEEE-754 round-to-nearest-even:
   `k = min(rint((m - a) * s), 32 * 2**F)` with `s = (inv_temperature * LOG2E) * 2**F`
   (F = FRACTION_BITS) computed as a Python float: one rounding, then an exact power-of-two
   scaling. Subtraction, multiplication, rint and min are correctly rounded (or exact)
   basic operations, each its own numpy call (no fused multiply-add): every IEEE machine
   and every numpy SIMD path gives the same bits, and none of them is a transcendental
   function (exp, log) whose last bit varies between libraries. `-k` is the symbol's
   log2-weight relative to the top symbol in units of 2**-F; -inf logits get the clamp.
3. Integers only from here (int64): `w = EXP2_TABLE[k % 2**F] >> (k // 2**F)`, i.e.
   `w ~ 2**30 * 2**(-k / 2**F)`: the top symbol has `w = 2**30`, and `w = 0` once
   `k >= 31 * 2**F`. `EXP2_TABLE[f] = round(2**30 * 2**(-f / 2**F))` is built at import
   with integer arithmetic only (same on every platform) and pinned by a hash in the tests.
4. `count = w * (T - V) // W + 1` for each of the V unmasked symbols, 0 for masked ones,
   with `T = 2**total_bits` and `W = sum(w)`. Every unmasked symbol can be coded, and
   `total = sum(count)` lies in `(T - V, T]`.

Costs of exactness against the float softmax: the exponent grid (step 2**-12 in log2)
moves each probability by < 0.02 %; the +1 floors cost `-log2(1 - V / T)` bits per token,
about 1e-4 for V = 151,936 at the default `T = 2**31`.

Temperature enters only through `inv_temperature` in step 2 (so T = 0.5 is
`inv_temperature=2.0`). Logits of -inf are allowed and get the floor count; only `mask`
makes a symbol uncodable.

Speed for V = 151,936 (shared 2-vCPU Xeon, numpy 2.4, best of many): `from_logits`
~1.0-1.2 ms; then `interval` ~25 us and `symbol_at` ~35 us, which avoid the full
`cumulative` (~0.5 ms, computed only if asked for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from numbers import Real
from operator import index

import numpy as np
import numpy.typing as npt

from uplimit.errors import CodecError

__all__ = ["EXP2_TABLE", "FRACTION_BITS", "LOG2E", "WEIGHT_BITS", "FrequencyTable"]

FRACTION_BITS = 12  # log2-weights are rounded to 1/4096: probabilities move by < 0.01 %
WEIGHT_BITS = 30  # the top symbol's weight; w * (T - V) < 2**62 fits int64 for T <= 2**32
LOG2E = float.fromhex("0x1.71547652b82fep+0")  # log2(e), nearest double (not libm's log2)

_MAX_K = 32 << FRACTION_BITS  # k beyond this gives w = 0 anyway (EXP2_TABLE < 2**31)
_BLOCK = 4096  # symbol_at cumulates block sums, then one block of this many counts


def _build_exp2_table() -> npt.NDArray[np.int64]:
    """round(2**30 * 2**(-f / 2**F)) for f in [0, 2**F), in integer arithmetic only.

    Fixed point with 160 fractional bits: 2**(-1/2**F) from F exact integer square roots
    (each truncated by < 1 unit), then its powers by repeated multiplication. The errors stay
    below 2**-140, far from changing a rounding at 2**-30 (the pinned hash checks it).
    """
    prec = 160
    one = 1 << prec
    root = one >> 1  # 2**-1, then 2**-(1/2), 2**-(1/4), ... 2**-(1/2**F)
    for _ in range(FRACTION_BITS):
        root = math.isqrt(root << prec)
    table = []
    power = one
    for _ in range(1 << FRACTION_BITS):
        table.append(((power << WEIGHT_BITS) + (one >> 1)) >> prec)
        power = (power * root) >> prec
    out = np.array(table, dtype=np.int64)
    out.flags.writeable = False
    return out


EXP2_TABLE = _build_exp2_table()


@dataclass(frozen=True, eq=False)
class FrequencyTable:
    """Integer counts per symbol; symbol s owns `[cumulative[s], cumulative[s+1])` of `[0, total)`.

    Build it with `from_logits`, or directly from counts (validated: 1-D int64, nonnegative,
    summing to `total` in `[1, 2**32]`, the limit of `coding.arith`).
    """

    counts: npt.NDArray[np.int64]
    total: int

    def __post_init__(self) -> None:
        counts = self.counts
        if not (isinstance(counts, np.ndarray) and counts.dtype == np.int64 and counts.ndim == 1):
            raise CodecError("counts must be a 1-D int64 array")
        try:
            total = index(self.total)
        except TypeError as exc:
            raise CodecError(f"total must be an integer: {exc}") from exc
        if not 1 <= total <= 1 << 32:
            raise CodecError(f"total must be in [1, 2**32], got {total}")
        # Bounding each count first keeps the int64 sum from wrapping around.
        if counts.min() < 0 or counts.max() > total or int(counts.sum()) != total:
            raise CodecError("counts must be nonnegative and sum to total")
        if counts.flags.writeable or counts.base is not None:
            counts = counts.copy()  # immutable: no one else may hold a writable handle on it
            counts.flags.writeable = False
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "total", total)

    @classmethod
    def from_logits(
        cls,
        logits: npt.NDArray[np.floating],
        *,
        inv_temperature: float = 1.0,
        mask: npt.NDArray[np.bool_] | None = None,
        total_bits: int = 31,
    ) -> FrequencyTable:
        """The table of `softmax(logits * inv_temperature)`, exactly as the module docstring says.

        `mask[s] = True` gives symbol s count 0 (it cannot be coded). Raises `CodecError` for
        input that is not 1-D float16/32/64, holds NaN or +inf in an unmasked entry, masks
        every symbol, or has more unmasked symbols than `2**total_bits`.
        """
        arr = np.asarray(logits)
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind != "f" or arr.dtype.itemsize > 8:
            raise CodecError(
                f"logits must be a nonempty 1-D float array, not {arr.dtype}{arr.shape}"
            )
        if not isinstance(inv_temperature, Real):
            raise CodecError(f"inv_temperature must be a real number, got {inv_temperature!r}")
        scale = float(inv_temperature) * LOG2E * (1 << FRACTION_BITS)
        if not (inv_temperature > 0 and math.isfinite(scale)):
            raise CodecError(f"inv_temperature must be positive and finite, got {inv_temperature}")
        if not (type(total_bits) is int and 1 <= total_bits <= 32):
            raise CodecError(f"total_bits must be in [1, 32], got {total_bits}")

        a = arr.astype(np.float64)  # exact for these dtypes; a fresh native-order copy
        n_codable = a.size
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype != np.bool_ or mask.shape != a.shape:
                raise CodecError(f"mask must be a bool array of shape {a.shape}")
            np.copyto(a, -np.inf, where=mask)  # masked logits are ignored, whatever they hold
            n_codable -= int(np.count_nonzero(mask))
            if n_codable == 0:
                raise CodecError("every symbol is masked")
        budget = (1 << total_bits) - n_codable  # counts left after every symbol's floor of 1
        if budget < 0:
            raise CodecError(f"{n_codable} symbols do not fit in a total of 2**{total_bits}")

        m = a.max()
        if not m < np.inf:  # NaN or +inf in an unmasked entry
            raise CodecError("logits must be finite or -inf")
        if m == -np.inf:  # every unmasked logit is -inf: alike, so a uniform table
            a.fill(0.0)
            if mask is not None:
                np.copyto(a, -np.inf, where=mask)
            m = 0.0

        # The one float step: k = rint((m - a) * scale) >= 0, clamped (-inf logits -> _MAX_K).
        np.subtract(m, a, out=a)
        np.multiply(a, scale, out=a)
        np.rint(a, out=a)
        np.minimum(a, _MAX_K, out=a)
        k = a.astype(np.int64)

        # w = EXP2_TABLE[k % 2**F] >> (k // 2**F)
        w = EXP2_TABLE.take(k & ((1 << FRACTION_BITS) - 1))
        np.right_shift(k, FRACTION_BITS, out=k)
        np.right_shift(w, k, out=w)
        weight_sum = int(w.sum())  # >= 2**30: the top symbol has k = 0
        counts = w
        counts *= budget
        counts //= weight_sum
        if mask is None:
            counts += 1
        else:
            counts += ~mask
        counts.flags.writeable = False
        return cls(counts, int(counts.sum()))

    @cached_property
    def cumulative(self) -> npt.NDArray[np.int64]:
        """`cumulative[s] = sum(counts[:s])`, length V + 1, computed on first use."""
        cum = np.zeros(self.counts.size + 1, dtype=np.int64)
        np.cumsum(self.counts, out=cum[1:])
        cum.flags.writeable = False
        return cum

    def interval(self, symbol: int) -> tuple[int, int]:
        """`(low, freq)` of a codable symbol, for `ArithmeticEncoder.encode(low, freq, total)`."""
        symbol = self._check_symbol(symbol)
        freq = int(self.counts[symbol])
        if freq == 0:
            raise CodecError(f"symbol {symbol} is masked: it cannot be coded")
        # A prefix sum reads half the table on average; a full cumsum costs ~20x more.
        return int(self.counts[:symbol].sum()), freq

    def symbol_at(self, target: int) -> int:
        """The symbol whose interval holds `target` (from `ArithmeticDecoder.decode_target`)."""
        target = index(target)
        if not 0 <= target < self.total:
            raise CodecError(f"target {target} outside [0, {self.total})")
        # Two levels, so that only one block is cumulated: find the block, then the symbol.
        # side="right" skips the empty intervals of masked symbols.
        counts = self.counts
        block_ends = np.cumsum(np.add.reduceat(counts, np.arange(0, counts.size, _BLOCK)))
        block = int(np.searchsorted(block_ends, target, side="right"))
        start = block * _BLOCK
        before = int(block_ends[block - 1]) if block else 0
        ends = np.cumsum(counts[start : start + _BLOCK])
        return start + int(np.searchsorted(ends, target - before, side="right"))

    def probability(self, symbol: int) -> float:
        """`counts[symbol] / total`: the probability the coder actually uses."""
        return int(self.counts[self._check_symbol(symbol)]) / self.total

    def cost_bits(self, symbol: int) -> float:
        """`-log2(probability(symbol))`, the ideal coded size; inf for a masked symbol."""
        count = int(self.counts[self._check_symbol(symbol)])
        return math.log2(self.total) - math.log2(count) if count else math.inf

    def _check_symbol(self, symbol: int) -> int:
        symbol = index(symbol)
        if not 0 <= symbol < self.counts.size:
            raise CodecError(f"symbol {symbol} outside [0, {self.counts.size})")
        return symbol
