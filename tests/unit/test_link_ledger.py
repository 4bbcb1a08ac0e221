"""Ledger semantics, on SQLite and on PostgreSQL (`ledger_target` runs each test on both;
the PostgreSQL runs skip, saying why, where no server can be started)."""

from __future__ import annotations

import logging
import math
import random
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from support.ledger import check_exhausted
from uplimit.errors import BudgetExhausted, ConfigError, LedgerError
from uplimit.link.budget import SECONDS_PER_DAY, Budgets, Limit
from uplimit.link.ledger import Alarm, SqliteLedger, init_ledger, open_served

T0 = 1_800_000_000.0


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_charges_are_recorded_with_their_split(ledger_target) -> None:
    ledger = ledger_target.open(Budgets(1000))
    r1 = ledger.charge(100, note="first")
    r2 = ledger.charge(50, timing_bytes=2)
    assert (r1.lifetime_bytes, r1.remaining_bytes) == (100, 900)
    assert (r2.n_bytes, r2.timing_bytes, r2.lifetime_bytes) == (50, 2, 152)
    state = ledger.usage()
    assert (state.wire_bytes, state.timing_bytes, state.usage.lifetime_bytes) == (150, 2, 152)
    assert state.charges == 2 and state.exhausted_by is None and state.remaining_bytes == 848
    log = ledger.charge_log()
    assert [(c.n_bytes, c.timing_bytes, c.note) for c in log] == [(100, 0, "first"), (50, 2, "")]
    assert [c.seq for c in ledger.charge_log(last=1)] == [r2.seq]


def test_state_survives_reopening(ledger_target) -> None:
    ledger = ledger_target.open(Budgets(1000, 500))
    ledger.charge(300)
    ledger.close()
    again = ledger_target.open()  # no budgets: take the stored ones
    assert again.usage().budgets == Budgets(1000, 500)
    assert again.usage().usage.lifetime_bytes == 300
    assert again.charge(200).lifetime_bytes == 500


def test_exhaustion_latches_and_survives_restart(ledger_target) -> None:
    seen: list[Alarm] = []
    ledger = ledger_target.open(Budgets(100), on_alarm=seen.append)
    ledger.charge(100)  # exactly the budget
    with pytest.raises(BudgetExhausted, match="lifetime budget of 100 bytes") as refused:
        ledger.charge(1)
    assert refused.value.limit == "lifetime"
    assert [a.kind for a in seen] == ["budget-exhausted"]
    assert "upload budget exhausted" in seen[0].message
    ledger.close()

    again = ledger_target.open()
    state = again.usage()
    assert state.exhausted_by is Limit.LIFETIME and state.exhausted_at is not None
    with pytest.raises(BudgetExhausted, match="an operator must raise the budget"):
        again.charge(1)
    assert state.usage.lifetime_bytes == 100  # refusals charge nothing
    assert [a.kind for a in again.alarms()] == ["budget-exhausted"]  # raised once


def test_a_rate_refusal_latches_too(ledger_target) -> None:
    clock = FakeClock()
    ledger = ledger_target.open(Budgets(10_000, None, 100), clock=clock)
    ledger.charge(100)
    with pytest.raises(BudgetExhausted) as refused:
        ledger.charge(1)
    assert refused.value.limit == "per_second"
    clock.t += 10  # a later second would fit, but the link stays shut
    with pytest.raises(BudgetExhausted):
        ledger.charge(1)


def test_raise_budget_is_audited_and_rearms(ledger_target) -> None:
    seen: list[Alarm] = []
    ledger = ledger_target.open(Budgets(100, 100), on_alarm=seen.append)
    ledger.charge(90)
    with pytest.raises(BudgetExhausted):
        ledger.charge(20)
    with pytest.raises(ConfigError, match="who and why"):
        ledger.raise_budget(Budgets(200, 200), who="ops", reason=" ")
    with pytest.raises(ConfigError, match="below what is already charged"):
        ledger.raise_budget(Budgets(80), who="ops", reason="tighten")
    assert ledger.usage().exhausted_by is Limit.LIFETIME  # failed attempts changed nothing

    change = ledger.raise_budget(Budgets(200, 200), who="alice", reason="ticket 42")
    assert (change.old, change.new) == (Budgets(100, 100), Budgets(200, 200))
    assert change.rearmed is Limit.LIFETIME
    assert ledger.charge(20).lifetime_bytes == 110
    ledger.close()

    again = ledger_target.open()
    [audit] = again.budget_changes()
    assert (audit.who, audit.reason, audit.old, audit.new) == (
        "alice",
        "ticket 42",
        Budgets(100, 100),
        Budgets(200, 200),
    )
    assert audit.rearmed is Limit.LIFETIME
    assert [a.kind for a in again.alarms()] == ["budget-exhausted", "budget-changed"]
    assert "alice changed the budget" in seen[-1].message and "ticket 42" in seen[-1].message


def test_budgets_never_change_on_open(ledger_target) -> None:
    ledger_target.open(Budgets(1000)).close()
    with pytest.raises(ConfigError, match="raise_budget"):
        ledger_target.open(Budgets(2000))
    ledger_target.open(Budgets(1000)).close()  # the same budgets are fine


# --- never fail open: a ledger is created only by `uplimit budget init` -------------------------


def _delete_budget_row(target) -> None:
    """What an attacker with write access to the database would do to reset the usage."""
    if target.kind == "sqlite":
        db = sqlite3.connect(target.where)
        with db:
            db.execute("DELETE FROM uplimit_budget WHERE name = ?", (target.name,))
        db.close()
    else:
        import psycopg

        with psycopg.connect(target.where, autocommit=True) as db:
            db.execute("DELETE FROM uplimit_budget WHERE name = %s", (target.name,))


def test_serving_never_creates_a_ledger(ledger_target) -> None:
    with pytest.raises(LedgerError, match="uplimit budget init"):
        ledger_target.open()
    if ledger_target.kind == "sqlite":
        assert not Path(ledger_target.where).exists()  # not even an empty file
    with pytest.raises(LedgerError, match="uplimit budget init"):
        open_served(ledger_target.where, Budgets(1000), name=ledger_target.name)


def test_init_records_an_id_and_its_time_and_runs_once(ledger_target) -> None:
    before = time.time()
    state = init_ledger(ledger_target.where, Budgets(1000, 10), name=ledger_target.name)
    assert re.fullmatch(r"[0-9a-f]{32}", state.ledger_id)
    assert before - 5 <= state.created_at <= time.time() + 5  # PostgreSQL: the server's clock
    assert (state.budgets, state.usage.lifetime_bytes) == (Budgets(1000, 10), 0)
    with pytest.raises(ConfigError, match="already initialised"):
        init_ledger(ledger_target.where, Budgets(1000, 10), name=ledger_target.name)
    served = open_served(ledger_target.where, Budgets(1000, 10), name=ledger_target.name)
    assert served.usage().ledger_id == state.ledger_id  # the id survives reopening
    served.close()
    with pytest.raises(ConfigError, match="budget raise"):
        open_served(ledger_target.where, Budgets(2000, 10), name=ledger_target.name)
    other = init_ledger(ledger_target.where, Budgets(1000, 10), name=ledger_target.name + "b")
    assert other.ledger_id != state.ledger_id


def test_a_deleted_budget_row_refuses_to_serve_or_reinit(
    ledger_target, caplog, monkeypatch
) -> None:
    ledger = ledger_target.open(Budgets(1000))
    ledger.charge(700)
    ledger.close()
    _delete_budget_row(ledger_target)
    # Another test's library may have disabled existing loggers (dictConfig's default).
    monkeypatch.setattr(logging.getLogger("uplimit.link.ledger"), "disabled", False)
    caplog.set_level(logging.ERROR, logger="uplimit.link.ledger")
    with pytest.raises(LedgerError, match="missing from the ledger"):
        open_served(ledger_target.where, Budgets(1000), name=ledger_target.name)
    assert "ALARM ledger-unusable" in caplog.text
    # Re-creating the row would start the usage at 0 again: not even init does that.
    with pytest.raises(LedgerError, match="tampered"):
        init_ledger(ledger_target.where, Budgets(1000), name=ledger_target.name)


def test_an_empty_or_corrupt_sqlite_file_refuses_to_serve(tmp_path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(LedgerError, match="no such table"):
        open_served(empty, Budgets(1000))
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError):
        open_served(corrupt, Budgets(1000))


def test_per_day_window_uses_utc_days(ledger_target) -> None:
    midnight = math.ceil(T0 / SECONDS_PER_DAY) * SECONDS_PER_DAY
    clock = FakeClock(midnight - 1)
    ledger = ledger_target.open(Budgets(10_000, 100), clock=clock)
    ledger.charge(100)
    clock.t = midnight  # a new UTC day
    ledger.charge(100)
    assert ledger.usage().usage.day_bytes == 100
    with pytest.raises(BudgetExhausted) as refused:
        ledger.charge(1)
    assert refused.value.limit == "per_day"


@pytest.mark.parametrize(("n", "timing"), [(0, 0), (-1, 0), (1, -1), (True, 0), (1.0, 0), (1, 0.5)])
def test_malformed_charges_are_refused(ledger_target, n: object, timing: object) -> None:
    ledger = ledger_target.open(Budgets(100))
    with pytest.raises(ConfigError):
        ledger.charge(n, timing_bytes=timing)  # type: ignore[arg-type]
    assert ledger.usage().charges == 0


def test_sqlite_refuses_an_overshoot_even_past_the_code(tmp_path) -> None:
    """Defence in depth: the table's CHECK keeps the lifetime total within its budget."""
    path = tmp_path / "ledger.db"
    SqliteLedger(path, Budgets(100)).close()
    db = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("UPDATE uplimit_budget SET lifetime_bytes = 101, wire_bytes = 101")
    db.close()


def test_sqlite_ledger_in_a_missing_directory_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError):
        SqliteLedger(tmp_path / "nope" / "ledger.db", Budgets(1))


def test_an_unreadable_ledger_fails_closed(tmp_path) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError):
        SqliteLedger(path, Budgets(1))


# --- concurrency: never overshoot, never lose a charge ------------------------------------------


@pytest.mark.parametrize("shared", [True, False], ids=["one-connection", "one-each"])
def test_threads_never_overshoot(ledger_target, shared: bool) -> None:
    budget, max_charge, n_threads = 20_000, 300, 8
    first = ledger_target.open(Budgets(budget))
    receipts: list[int] = []
    lock = threading.Lock()

    def work(seed: int) -> None:
        ledger = first if shared else ledger_target.open()
        rng = random.Random(seed)
        while True:
            n = rng.randint(1, max_charge)
            try:
                r = ledger.charge(n - 1, timing_bytes=1)
            except BudgetExhausted:
                return
            with lock:
                receipts.append(r.n_bytes + r.timing_bytes)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check_exhausted(first, budget, receipts, max_charge)
