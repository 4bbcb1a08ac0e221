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


def test_a_server_without_fsync_is_refused(postgres_url: str) -> None:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("ALTER SYSTEM SET fsync = off")
        admin.execute("SELECT pg_reload_conf()")
        try:
            time.sleep(0.2)  # the reload is asynchronous
            with pytest.raises(LedgerError, match="fsync=off"):
                PostgresLedger(postgres_url, Budgets(100), name=_name())
        finally:
            admin.execute("ALTER SYSTEM RESET fsync")
            admin.execute("SELECT pg_reload_conf()")
    time.sleep(0.2)
    PostgresLedger(postgres_url, Budgets(100), name=_name()).close()


def test_an_unreachable_server_fails_closed() -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(LedgerError):
        PostgresLedger("postgresql://nobody@127.0.0.1:1/none", Budgets(1))
