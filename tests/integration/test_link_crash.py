"""Crash safety: kill -9 a real sender or receiver at random instants, on SQLite and on
PostgreSQL; the ledger never under-charges (`support.crash` has the trials).

`make test` runs `CRASH_TRIALS` (54) trials in all; `make crash` runs 1,000+ (set by
UPLIMIT_CRASH_TRIALS) and prints, per victim and ledger and in total, the trials, the
under-charges (must be 0) and the worst over-charge of one trial.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import pytest

from support.crash import Tally, run_trials
from uplimit.link.budget import Budgets

SCENARIOS = [("inner", "charge"), ("inner", "write"), ("outer", "receive")]
CRASH_TRIALS = int(os.environ.get("UPLIMIT_CRASH_TRIALS", "54"))
_TALLIES: list[tuple[str, Tally]] = []


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    if not _TALLIES:
        return
    total = Tally()
    for what, t in _TALLIES:
        print(f"\n{what}: {t.trials} trials, {t.with_traffic} with traffic, {t.under_charges}"
              f" under-charges, worst over-charge {t.worst_over:,} bytes")  # fmt: skip
        total.trials += t.trials
        total.with_traffic += t.with_traffic
        total.under_charges += t.under_charges
        total.worst_over = max(total.worst_over, t.worst_over)
    print(f"kill -9 trials: {total.trials}; under-charges: {total.under_charges};"
          f" worst over-charge: {total.worst_over:,} bytes")  # fmt: skip


@pytest.mark.parametrize(("victim", "moment"), SCENARIOS, ids=[f"{v}-{m}" for v, m in SCENARIOS])
def test_kill_9_never_leaves_bytes_uncharged(ledger_target, victim, moment, tmp_path) -> None:
    ledger_target.open(Budgets(10**12)).close()
    n = math.ceil(CRASH_TRIALS / (2 * len(SCENARIOS)))  # 2 ledgers
    tally = run_trials(ledger_target.where, ledger_target.name, victim, moment, n, tmp_path)
    _TALLIES.append((f"{ledger_target.kind}, {victim} killed mid-{moment}", tally))
    assert tally.trials == n
    assert tally.under_charges == 0
    assert tally.with_traffic >= n // 2  # the kills did land while frames were flowing
