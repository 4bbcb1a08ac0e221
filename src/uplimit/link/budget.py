"""Upload budgets and the timing-channel charge: pure arithmetic, no I/O.

Budgets
-------
Three budgets bound the bytes charged to a link's ledger (`Budgets`):

* lifetime: all bytes ever charged. The security bound: it must stay far below the size of
  the weights (default: 1 % of the strong model's weight file, `Budgets.default_for`).
* per day: bytes charged in one UTC calendar day (`floor(unix_time / 86400)`).
* per second: bytes charged in one calendar second (`floor(unix_time)`).

The windows' clock is `steady_time`: the wall clock when the process started, carried forward
by the monotonic clock, so a step of the system clock (NTP, an operator, an attacker with root)
moves no window while the process runs. Across a restart (or with PostgreSQL's server clock) a
step can show; `Usage.at` keeps it from resetting a day or stalling any window (below).

Both windows are fixed, aligned windows, so the two rate budgets mean the same kind of thing and
fit in one database row. Across a window boundary up to twice a window's budget can be charged
within one window's length (the end of one window plus the start of the next): any interval of
`t` seconds holds at most `per_second * (ceil(t) + 1)` bytes. The rate budgets buy time for an
alarm to be seen; the lifetime budget is the bound that matters.

`decide(budgets, usage, n, now)` is the one decision every ledger makes, inside the transaction
that records the charge. A charge is all or nothing (frames are not split) and is refused if it
would make any total exceed its budget by even one byte; the refusal names the budget
(lifetime first, then per day, then per second).

Clock steps that reach the windows (a restart, PostgreSQL's clock): a clock stepped forward
starts new (empty) windows. A clock stepped back finds the day window ahead of `now` and moves
it back to `now`'s day, keeping its bytes: stepping back never empties a day, and the next
charge (at the latest the inner's END, or the connection charge of a restarted inner) stores
the day where it now is, so a step forward and back never leaves it stranded in the future,
where it would not roll over until the clock caught up. The per-second window is a rate: a
second ahead of `now` is simply over, as is one behind it, so a waiting frame never waits for
a second that does not come; a step back can give at most one more second's budget.

Timing channel
--------------
The uplink writes frames only at tick boundaries (`DEFAULT_TICK_S` = 100 ms), at most one frame
per tick. Besides the bytes of the frames (charged byte for byte), an observer of the uplink
learns:

1. which ticks carry a frame: at most 1 bit per tick (send / no send), 10 bit/s at 100 ms;
2. each frame's size. Frames are self-delimiting (each frame's code says where it ends), so
   the set of possible frames is prefix-free and charging 8 bits per byte already pays for the
   size: summed over every possible frame f, 2 ** -(8 * len(f)) <= 1 (Kraft).
   Without that, a size would be worth about 2 log2(len) more bits per frame.
3. where inside its tick a frame leaves (jitter). The pacer writes at the boundary; what is
   left is the scheduler's and fsync's noise. Only a receiver that re-times frames to ticks
   removes it: that is the transport's part, outside this module's bound.

Charging every tick 1 bit would cost 108 kB per idle day, so the ledger would drain with no
traffic. Instead each frame pays for the gap before it, with a prefix code over gaps that is
chosen by the gap before the last frame, `p` (0 for the first frame of a connection), which
both ends have seen. After `g` silent ticks a frame costs `timing_cost_units(g, p)`:

* g = p (the cadence kept):      log2(16/15) = 0.0931 bit;
* g = p - 1 or g = p + 1:        6 bits (1/64 each: a deadline that slipped by a tick);
* any g >= 0 (the escape):       5 + (2 * floor(log2(g + 1)) + 1) bits (a 5-bit escape, then
                                 Elias gamma of g + 1), charged only when the above do not apply.

A link streaming a frame every tick keeps p = 0; one that sends at a latency deadline
(`[link] max_latency_s`) keeps p = the deadline's gap; both pay 0.09 bit a frame.
For every p these lengths satisfy Kraft's inequality,
15/16 + 2/64 + 1/32 * sum_{n>=1} 2**-gamma(n) <= 1 (the escape also spends code space on gaps
that have a shorter code, and p = 0 has no p - 1), so the probabilities 2**-cost(g | p) are a
conditional distribution over the next gap given the gaps so far. Over any k frames, the sum of
2**-(total charge) over all gap sequences is then at most 1 (induction over the frames: sum
over the last gap first), so the patterns whose total charge is at most C bits number at most
2**C, and the pattern of a connection with k frames and C charged timing bits carries at most
C + log2(k + 1) bits (the log2 term counts k). Together with the frames' bytes
(also a prefix-free code) everything an observer can read from ticks, sizes and contents is
bounded by what the ledger charged, plus that log term.
Timing bits are kept in 1/65536 bit (`TIMING_UNIT`) and prepaid in whole bytes: a frame charges
as many extra bytes as its cost exceeds the credit left over (`timing_charge`); a crash loses the
credit, which can only over-charge.

The tick grid starts when a connection is made, and the instant of connecting is itself a signal:
each connection is charged `CONNECT_CHARGE_BYTES` = 64 bits, enough to name any nanosecond in
584 years. Refusing a charge latches the ledger, so "when the budget ran out" is said once.

At 100 ms: a link streaming a frame every tick, or at a steady deadline, pays 0.09 bit a frame
(0.93 bit/s, 10.1 kB/day, every tick); a frame after 1 s of silence that breaks the cadence 12
bits; after an hour, 36 bits.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import StrEnum
from operator import index

from uplimit.errors import ConfigError

__all__ = [
    "CONNECT_CHARGE_BYTES",
    "DEFAULT_LIFETIME_DIVISOR",
    "DEFAULT_TICK_S",
    "SECONDS_PER_DAY",
    "TIMING_UNIT",
    "Budgets",
    "Decision",
    "Limit",
    "TimingCapacity",
    "TimingState",
    "Usage",
    "decide",
    "steady_time",
    "timing_capacity",
    "timing_charge",
    "timing_cost_units",
]

SECONDS_PER_DAY = 86_400
DEFAULT_LIFETIME_DIVISOR = 100  # lifetime budget = weights / 100 (the seed post's 1 %)
DEFAULT_TICK_S = 0.1

TIMING_UNIT = 1 << 16  # timing costs are counted in 1/65536 bit
_BYTE_UNITS = 8 * TIMING_UNIT
# The code behind the costs (module doc): P(the last gap again) = 15/16, P(one tick more or
# less) = 1/64 each, P(escape, then Elias gamma of gap + 1) = 1/32.
# -log2(15/16) rounded up to a whole unit: rounding up keeps Kraft's sum <= 1.
_STREAK_UNITS = math.ceil(math.log2(16 / 15) * TIMING_UNIT)
_NEIGHBOUR_BITS = 6
_ESCAPE_BITS = 5
CONNECT_CHARGE_BYTES = 8

# `steady_time`'s anchor: taken once per process, so every ledger and link in it agree.
_WALL_AT_START = time.time()
_MONOTONIC_AT_START = time.monotonic()


def steady_time() -> float:
    """Unix time for budget windows: the wall clock at process start plus monotonic time
    since, so that no step of the system clock moves a window (module doc)."""
    return _WALL_AT_START + (time.monotonic() - _MONOTONIC_AT_START)


class Limit(StrEnum):
    """Which budget refused a charge."""

    LIFETIME = "lifetime"
    PER_DAY = "per_day"
    PER_SECOND = "per_second"

    @property
    def label(self) -> str:
        return self.value.replace("_", "-")


def _count(value: object, what: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an integer number of bytes, got {value!r}")
    try:
        n = index(value)
    except TypeError:
        raise ConfigError(f"{what} must be an integer number of bytes, got {value!r}") from None
    if n < 0:
        raise ConfigError(f"{what} must be >= 0, got {n}")
    return n


@dataclass(frozen=True)
class Budgets:
    """Byte budgets of one ledger; `None` means no such budget."""

    lifetime_bytes: int
    per_day_bytes: int | None = None
    per_second_bytes: int | None = None

    def __post_init__(self) -> None:
        _count(self.lifetime_bytes, "lifetime budget")
        _count(self.per_day_bytes, "per-day budget", optional=True)
        _count(self.per_second_bytes, "per-second budget", optional=True)

    @classmethod
    def default_for(
        cls,
        weights_bytes: int,
        *,
        per_day_bytes: int | None = None,
        per_second_bytes: int | None = None,
    ) -> Budgets:
        """The default: a lifetime of 1 % of the weights (rounded down)."""
        weights = _count(weights_bytes, "weights size")
        return cls(weights // DEFAULT_LIFETIME_DIVISOR, per_day_bytes, per_second_bytes)

    def limit(self, which: Limit) -> int | None:
        return {
            Limit.LIFETIME: self.lifetime_bytes,
            Limit.PER_DAY: self.per_day_bytes,
            Limit.PER_SECOND: self.per_second_bytes,
        }[which]


@dataclass(frozen=True)
class Usage:
    """Bytes charged so far: lifetime, and in the current day and second windows."""

    lifetime_bytes: int = 0
    day: int = 0  # UTC day number (unix days) that `day_bytes` belongs to
    day_bytes: int = 0
    second: int = 0  # unix second that `second_bytes` belongs to
    second_bytes: int = 0

    def at(self, now: float) -> Usage:
        """This usage seen at unix time `now`: a window behind `now` is over (emptied). A day
        ahead of `now` (the clock was stepped back) moves back to `now`'s day with its bytes;
        a second ahead of `now` is over, like any other second (module doc)."""
        day, second = math.floor(now / SECONDS_PER_DAY), math.floor(now)
        return Usage(
            self.lifetime_bytes,
            day,
            self.day_bytes if day <= self.day else 0,
            second,
            self.second_bytes if second == self.second else 0,
        )

    def used(self, which: Limit) -> int:
        return {
            Limit.LIFETIME: self.lifetime_bytes,
            Limit.PER_DAY: self.day_bytes,
            Limit.PER_SECOND: self.second_bytes,
        }[which]


@dataclass(frozen=True)
class Decision:
    """Outcome of `decide`: the usage to store, and the budget that refused (if any).

    When refused, `usage` is the usage rolled to `now` without the charge.
    """

    usage: Usage
    refused: Limit | None

    @property
    def accepted(self) -> bool:
        return self.refused is None


def decide(budgets: Budgets, usage: Usage, n_bytes: int, now: float) -> Decision:
    """Whether charging `n_bytes` at unix time `now` fits every budget, and the usage after."""
    n = _count(n_bytes, "charge")
    rolled = usage.at(now)
    after = Usage(
        rolled.lifetime_bytes + n,
        rolled.day,
        rolled.day_bytes + n,
        rolled.second,
        rolled.second_bytes + n,
    )
    for which in Limit:
        cap = budgets.limit(which)
        if cap is not None and after.used(which) > cap:
            return Decision(rolled, which)
    return Decision(after, None)


# --- timing channel -------------------------------------------------------------------------


def timing_cost_units(gap: int, last_gap: int = 0) -> int:
    """Charge, in `TIMING_UNIT`s, for a frame sent after `gap` silent ticks when the frame
    before it came after `last_gap` (see module doc)."""
    g, p = index(gap), index(last_gap)
    if g < 0 or p < 0:
        raise ConfigError(f"gaps must be >= 0 ticks, got {g} after {p}")
    if g == p:
        return _STREAK_UNITS
    if abs(g - p) == 1:
        return _NEIGHBOUR_BITS * TIMING_UNIT
    gamma_bits = 2 * ((g + 1).bit_length() - 1) + 1
    return (_ESCAPE_BITS + gamma_bits) * TIMING_UNIT


@dataclass(frozen=True)
class TimingState:
    """Where a connection's tick pattern stands.

    Ticks count from the connection (tick 0); `last_gap` is the silent ticks before the last
    frame (the code's context, module doc); `credit_units` is timing already prepaid in whole
    bytes but not yet used, in `TIMING_UNIT`s (always < 8 bits).
    """

    last_tick: int = 0
    last_gap: int = 0
    credit_units: int = 0


def timing_charge(state: TimingState, tick: int) -> tuple[int, TimingState]:
    """Bytes to prepay for a frame sent at `tick`, and the state once it is sent.

    Apply the returned state only after the frame was charged; until then nothing changed.
    """
    t = index(tick)
    if t <= state.last_tick:
        raise ConfigError(f"tick {t} is not after the last frame's tick {state.last_tick}")
    gap = t - state.last_tick - 1
    cost = timing_cost_units(gap, state.last_gap)
    prepay = max(0, -(-(cost - state.credit_units) // _BYTE_UNITS))
    return prepay, TimingState(t, gap, state.credit_units + prepay * _BYTE_UNITS - cost)


@dataclass(frozen=True)
class TimingCapacity:
    """The timing channel of a tick length, and what the charge costs an honest link."""

    tick_s: float
    pattern_bits_per_tick: float  # send / no send; sizes are paid by the bytes (module doc)
    pattern_bits_per_second: float
    pattern_bytes_per_day: float  # what charging every tick 1 bit would cost
    streaming_bits_per_second: float  # charged timing when a frame goes out every tick
    streaming_bytes_per_day: float


def timing_capacity(tick_s: float = DEFAULT_TICK_S) -> TimingCapacity:
    """Worst-case capacity of the send / no-send channel at `tick_s`, and its charge."""
    if not tick_s > 0:
        raise ConfigError(f"tick length must be > 0 s, got {tick_s!r}")
    per_s = 1 / tick_s
    streaming = _STREAK_UNITS / TIMING_UNIT * per_s
    return TimingCapacity(
        tick_s=tick_s,
        pattern_bits_per_tick=1.0,
        pattern_bits_per_second=per_s,
        pattern_bytes_per_day=per_s * SECONDS_PER_DAY / 8,
        streaming_bits_per_second=streaming,
        streaming_bytes_per_day=streaming * SECONDS_PER_DAY / 8,
    )
