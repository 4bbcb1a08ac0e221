"""Budget arithmetic and the timing-channel charge (sans-IO)."""

from __future__ import annotations

import itertools
import math
import time
from decimal import Decimal, getcontext

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uplimit.errors import ConfigError
from uplimit.link.budget import (
    SECONDS_PER_DAY,
    TIMING_UNIT,
    Budgets,
    Limit,
    TimingState,
    Usage,
    decide,
    steady_time,
    timing_capacity,
    timing_charge,
    timing_cost_units,
)
from uplimit.models.store import STRONG

DAY = SECONDS_PER_DAY
T0 = 1_800_000_000.25  # an arbitrary unix time, mid-second


def test_default_lifetime_is_one_percent_of_the_strong_weights() -> None:
    assert Budgets.default_for(STRONG.size).lifetime_bytes == 11_173_207
    assert Budgets.default_for(STRONG.size) == Budgets(11_173_207, None, None)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10", None])
def test_budgets_reject_non_counts(bad: object) -> None:
    with pytest.raises(ConfigError):
        Budgets(bad)  # type: ignore[arg-type]
    if bad is not None:
        with pytest.raises(ConfigError):
            Budgets(10, per_second_bytes=bad)  # type: ignore[arg-type]


def test_exact_fit_is_accepted_one_byte_more_is_refused() -> None:
    b = Budgets(100, 100, 100)
    fits = decide(b, Usage(), 100, T0)
    assert fits.accepted and fits.usage.lifetime_bytes == 100
    over = decide(b, fits.usage, 1, T0)
    assert over.refused is Limit.LIFETIME
    assert over.usage == fits.usage  # a refusal changes nothing


def test_refusal_names_lifetime_before_day_before_second() -> None:
    u = Usage(10, math.floor(T0 / DAY), 10, math.floor(T0), 10)
    assert decide(Budgets(10, 10, 10), u, 1, T0).refused is Limit.LIFETIME
    assert decide(Budgets(99, 10, 10), u, 1, T0).refused is Limit.PER_DAY
    assert decide(Budgets(99, 99, 10), u, 1, T0).refused is Limit.PER_SECOND
    assert decide(Budgets(99, 99, 99), u, 1, T0).accepted


def test_windows_roll_forward_and_a_step_back_keeps_their_bytes() -> None:
    b = Budgets(1000, 100, 10)
    u = decide(b, Usage(), 10, T0).usage
    assert decide(b, u, 1, T0 + 0.5).refused is Limit.PER_SECOND  # same second
    assert decide(b, u, 10, T0 + 1).accepted  # next second
    assert decide(b, u, 10, T0 - 5).accepted  # clock stepped back: another second
    u = Usage(50, math.floor(T0 / DAY), 100, math.floor(T0), 0)
    assert decide(b, u, 1, T0 + 5).refused is Limit.PER_DAY
    assert decide(b, u, 1, T0 - 3 * DAY).refused is Limit.PER_DAY  # no reset going back
    assert decide(b, u, 10, T0 + DAY).accepted


def test_a_step_forward_and_back_strands_no_window_in_the_future() -> None:
    """The clock jumps a day (and an hour) ahead, a charge fills both windows there, the clock
    comes back: the windows come back with their bytes, and roll over on the real clock."""
    b = Budgets(1000, 100)
    ahead = T0 + DAY + 3600
    u = decide(b, Usage(), 100, ahead).usage  # today's budget, spent "tomorrow"
    back = decide(b, u, 1, T0)
    assert back.refused is Limit.PER_DAY  # stepping back reset nothing
    assert back.usage.day == math.floor(T0 / DAY) and back.usage.day_bytes == 100
    assert decide(b, back.usage, 10, T0 + DAY).accepted  # a real day later, not at `ahead`
    # A second ahead is over: a frame waiting for the next second gets it.
    u = decide(Budgets(1000, None, 10), Usage(), 10, ahead).usage
    assert decide(Budgets(1000, None, 10), u, 10, T0).accepted


def test_steady_time_ignores_a_step_of_the_system_clock(monkeypatch) -> None:
    before = steady_time()
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() - 10 * DAY)  # stepped back ten days
    after = steady_time()
    assert 0 <= after - before < 60
    monkeypatch.setattr(time, "time", lambda: wall() + 10 * DAY)  # and forward
    assert 0 <= steady_time() - after < 60


charges = st.lists(
    st.tuples(st.integers(0, 60), st.floats(-3 * DAY / 2, 3 * DAY / 2, allow_nan=False)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    lifetime=st.integers(0, 600),
    per_day=st.none() | st.integers(0, 300),
    per_second=st.none() | st.integers(0, 100),
    steps=charges,
)
def test_decide_matches_a_history_model(
    lifetime: int, per_day: int | None, per_second: int | None, steps: list
) -> None:
    """Against an independent model that keeps every accepted charge: no budget is ever
    exceeded, every refusal names a budget the charge would really exceed (the first in
    order), and every charge that fits is accepted."""
    budgets = Budgets(lifetime, per_day, per_second)
    usage, t = Usage(), T0
    history: list[tuple[int, int, int]] = []  # (day, second, n) of accepted charges
    # A window is numbered by how often it changed: a day when the clock moved past its end
    # (stepping back is no new day: dt < 0), a second whenever the clock left it.
    day_now = second_now = -(10**12)
    days = seconds = 0
    for n, dt in steps:
        t += dt
        days += math.floor(t / DAY) > day_now
        seconds += math.floor(t) != second_now
        day_now, second_now = math.floor(t / DAY), math.floor(t)
        totals = {
            Limit.LIFETIME: sum(c for _, _, c in history) + n,
            Limit.PER_DAY: sum(c for d, _, c in history if d == days) + n,
            Limit.PER_SECOND: sum(c for _, s, c in history if s == seconds) + n,
        }
        over = [w for w in Limit if budgets.limit(w) is not None and totals[w] > budgets.limit(w)]
        decision = decide(budgets, usage, n, t)
        assert decision.refused == (over[0] if over else None)
        usage = decision.usage
        if decision.accepted:
            history.append((days, seconds, n))
        for w in Limit:
            if budgets.limit(w) is not None:
                assert usage.used(w) <= budgets.limit(w)
        assert usage.lifetime_bytes == sum(c for _, _, c in history)


# --- timing channel ---------------------------------------------------------------------------


def test_timing_costs_are_pinned() -> None:
    assert timing_cost_units(0) == timing_cost_units(4, 4) == 6103  # ceil(log2(16/15) * 2**16)
    assert timing_cost_units(3, 4) == timing_cost_units(5, 4) == 6 * TIMING_UNIT
    # The escape: 5 bits, then Elias gamma of gap + 1.
    assert [timing_cost_units(g) // TIMING_UNIT for g in (1, 2, 3, 4, 9)] == [6, 8, 10, 10, 12]
    assert timing_cost_units(0, 2) == 6 * TIMING_UNIT  # 5 + gamma(1) = 6 as well
    assert timing_cost_units(35_999) == 36 * TIMING_UNIT  # a frame after an hour at 100 ms
    assert all(timing_cost_units(g, 3) % TIMING_UNIT == 0 for g in range(0, 1000) if g != 3)
    with pytest.raises(ConfigError):
        timing_cost_units(1, -1)


@pytest.mark.parametrize("last_gap", [0, 1, 5, 1000])
def test_streak_cost_rounds_up_so_kraft_holds_exactly(last_gap: int) -> None:
    getcontext().prec = 60
    streak = Decimal(2) ** (Decimal(-timing_cost_units(last_gap, last_gap)) / TIMING_UNIT)
    assert streak <= Decimal(15) / 16  # the streak's share of the code space
    assert Decimal(15) / 16 - streak < Decimal("1e-5")  # and hardly less
    # Every other gap's share: its neighbours' 1/64 each, the escape's 1/32 in the limit.
    others = sum(
        Decimal(2) ** -(timing_cost_units(g, last_gap) // TIMING_UNIT)
        for g in range(0, 1 << 16)
        if g != last_gap
    )
    assert others <= Decimal(1) / 16


def _pattern_units(sent: tuple[int, ...]) -> int:
    units, last, last_gap = 0, 0, 0
    for tick in sent:
        gap = tick - last - 1
        units += timing_cost_units(gap, last_gap)
        last, last_gap = tick, gap
    return units


def test_every_tick_pattern_costs_at_least_its_information() -> None:
    """Exhaustively over 14 ticks: for each number k of frames, the sum over all send patterns
    of 2**-cost is <= 1, so at most 2**C patterns of k frames cost <= C bits."""
    ticks = 14
    for k in range(1, ticks + 1):
        kraft = sum(
            2.0 ** (-_pattern_units(sent) / TIMING_UNIT)
            for sent in itertools.combinations(range(1, ticks + 1), k)
        )
        assert kraft <= 1 + 1e-12, (k, kraft)


def test_a_steady_deadline_costs_what_streaming_does() -> None:
    """Frames every 5 ticks (a 0.5 s deadline at 100 ms) pay the escape once, then 0.09 bit."""
    steady = _pattern_units(tuple(range(5, 501, 5)))
    assert steady == 10 * TIMING_UNIT + 99 * 6103  # gap 4 once (5 + gamma(5)), then kept
    jitter = _pattern_units((5, 10, 16, 21, 26))  # one tick late, then back
    assert jitter == 10 * TIMING_UNIT + 6103 + 2 * 6 * TIMING_UNIT + 6103


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=200))
def test_prepaid_bytes_cover_the_cost_and_waste_under_a_byte(steps: list[int]) -> None:
    state, prepaid, cost, last_gap = TimingState(), 0, 0, 0
    for step in steps:
        tick = state.last_tick + step
        nbytes, state = timing_charge(state, tick)
        prepaid += nbytes
        cost += timing_cost_units(step - 1, last_gap)
        last_gap = step - 1
        assert 0 <= state.credit_units < 8 * TIMING_UNIT
        assert prepaid * 8 * TIMING_UNIT - cost == state.credit_units


def test_timing_charge_needs_a_later_tick() -> None:
    _, state = timing_charge(TimingState(), 5)
    with pytest.raises(ConfigError):
        timing_charge(state, 5)


def test_streaming_costs_a_byte_every_86_frames() -> None:
    state, paid = TimingState(), []
    for tick in range(1, 1001):
        nbytes, state = timing_charge(state, tick)
        paid.append(nbytes)
    assert sum(paid) == math.ceil(1000 * 6103 / (8 * TIMING_UNIT))  # 12 bytes per 1000 frames
    assert set(paid) == {0, 1}


def test_capacity_at_the_default_tick() -> None:
    c = timing_capacity()
    assert c.tick_s == 0.1
    assert c.pattern_bits_per_tick == 1
    assert c.pattern_bits_per_second == pytest.approx(10)
    assert c.pattern_bytes_per_day == pytest.approx(108_000)
    assert c.streaming_bits_per_second == pytest.approx(0.9312, abs=1e-4)
    assert c.streaming_bytes_per_day == pytest.approx(10_058, abs=1)
    with pytest.raises(ConfigError):
        timing_capacity(0)
