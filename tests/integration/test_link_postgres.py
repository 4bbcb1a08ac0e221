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
from uplimit.link.ledger import PostgresLedger, init_ledger, open_ledger


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


def test_the_inner_role_may_charge_and_nothing_else(postgres_url: str) -> None:
    """A role granted with `grant_charger` (the inner host's) charges through the ordinary
    ledger code; by hand it cannot lower the usage (a window's either), start a window ahead of
    the server's clock, raise a budget, clear the latch, or create or delete a budget. The
    owner (the operator) still raises, audited."""
    import psycopg

    name, role = _name(), f"inner_{uuid.uuid4().hex[:8]}"
    init_ledger(postgres_url, Budgets(1000), name=name)
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
    with PostgresLedger(postgres_url, name=name) as owner:
        owner.grant_charger(role)
    inner_url = postgres_url.replace("postgres@", f"{role}@", 1)
    with PostgresLedger(inner_url, name=name, link="inner") as inner:
        assert inner.charge(600).lifetime_bytes == 600
        with pytest.raises(LedgerError, match="only the ledger's owner changes a budget"):
            inner.raise_budget(Budgets(10**9), who="inner", reason="more")
        with pytest.raises(BudgetExhausted):
            inner.charge(500)  # latches, as any refusal does
    forbidden = [
        ("UPDATE uplimit_budget SET lifetime_bytes = 0, wire_bytes = 0, timing_bytes = 0"
         " WHERE name = %s", "never lowers the usage"),
        ("UPDATE uplimit_budget SET lifetime_limit = 10000000 WHERE name = %s", "changes a budget"),
        ("UPDATE uplimit_budget SET day_bytes = 0 WHERE name = %s", "lowers a window"),
        ("UPDATE uplimit_budget SET second_bytes = 0 WHERE name = %s", "lowers a window"),
        ("UPDATE uplimit_budget SET day = day - 1, day_bytes = 0 WHERE name = %s",
         "lowers a window"),
        ("UPDATE uplimit_budget SET day = day + 2, day_bytes = 0 WHERE name = %s",
         "ahead of the server's clock"),
        ("UPDATE uplimit_budget SET second = second + 60, second_bytes = 0 WHERE name = %s",
         "ahead of the server's clock"),
        ("UPDATE uplimit_budget SET exhausted_by = NULL, exhausted_at = NULL WHERE name = %s",
         "clears the latch"),
        ("DELETE FROM uplimit_budget WHERE name = %s", "permission denied"),
        ("DELETE FROM uplimit_charges WHERE budget = %s", "permission denied"),
    ]  # fmt: skip
    with psycopg.connect(inner_url, autocommit=True) as db:
        for statement, error in forbidden:
            with pytest.raises(psycopg.Error, match=error):
                db.execute(statement, (name,))
        with pytest.raises(psycopg.Error, match="must be owner"):
            db.execute("ALTER TABLE uplimit_budget DISABLE TRIGGER uplimit_budget_guard")
    with PostgresLedger(postgres_url, name=name) as owner:
        state = owner.usage()
        assert (state.usage.lifetime_bytes, state.budgets.lifetime_bytes) == (600, 1000)
        assert state.exhausted_by is not None
        owner.raise_budget(Budgets(2000), who="operator", reason="ticket 7")
        assert owner.usage().exhausted_by is None


def test_budget_grant_is_an_operator_command(postgres_url: str) -> None:
    import psycopg
    from typer.testing import CliRunner

    from uplimit.cli import app

    name, role = _name(), f"inner_{uuid.uuid4().hex[:8]}"
    init_ledger(postgres_url, Budgets(1000), name=name)
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
    out = CliRunner().invoke(
        app, ["budget", "grant", "--ledger", postgres_url, "--role", role, "--budget", name]
    )
    assert out.exit_code == 0, out.output
    with PostgresLedger(postgres_url.replace("postgres@", f"{role}@", 1), name=name) as inner:
        assert inner.charge(10).lifetime_bytes == 10
