"""PostgreSQL specifics of the shared ledger, against a real server (`postgres_url` fixture,
tests/conftest.py; skips, saying why, without the server binaries or psycopg).

The ledger's semantics (latch, audit, windows, concurrent threads and processes) run on
PostgreSQL too: tests/unit/test_link_ledger.py, the `[postgres]` cases.
"""

from __future__ import annotations

import time
import uuid

import pytest

from uplimit.errors import BudgetExhausted, LedgerError
from uplimit.link.budget import Budgets
from uplimit.link.ledger import PostgresLedger, open_ledger


def _name() -> str:
    return f"pg-{uuid.uuid4().hex[:10]}"


def test_windows_use_the_servers_clock(postgres_url: str) -> None:
    with PostgresLedger(postgres_url, Budgets(1000), name=_name()) as ledger:
        receipt = ledger.charge(10)
    assert abs(receipt.at - time.time()) < 5  # same host here, so the clocks agree


def test_budgets_in_one_database_are_independent(postgres_url: str) -> None:
    a = open_ledger(postgres_url, Budgets(100), name=_name(), link="a")
    b = open_ledger(postgres_url, Budgets(100), name=_name(), link="b")
    assert isinstance(a, PostgresLedger)
    a.charge(100)
    with pytest.raises(BudgetExhausted):
        a.charge(1)
    assert b.charge(100).lifetime_bytes == 100
    a.close()
    b.close()


def _set_fsync(url: str, value: str | None) -> None:
    """ALTER SYSTEM, then wait until a new session sees it: the reload is asynchronous."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"ALTER SYSTEM SET fsync = {value}" if value else "ALTER SYSTEM RESET fsync")
        admin.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 30
    while True:
        with psycopg.connect(url) as conn:
            seen = conn.execute("SHOW fsync").fetchone()[0]
        if seen == (value or "on"):
            return
        assert time.monotonic() < deadline, f"fsync still {seen} 30 s after the reload"
        time.sleep(0.05)


def test_a_server_without_fsync_is_refused(postgres_url: str) -> None:
    _set_fsync(postgres_url, "off")
    try:
        with pytest.raises(LedgerError, match="fsync=off"):
            PostgresLedger(postgres_url, Budgets(100), name=_name())
    finally:
        _set_fsync(postgres_url, None)
    PostgresLedger(postgres_url, Budgets(100), name=_name()).close()


def test_an_unreachable_server_fails_closed() -> None:
    with pytest.raises(LedgerError):
        PostgresLedger("postgresql://nobody@127.0.0.1:1/none", Budgets(1))
