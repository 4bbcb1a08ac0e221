"""`uplimit budget`: raising a budget is an explicit, audited operator action."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from uplimit.cli import app
from uplimit.errors import BudgetExhausted, ConfigError
from uplimit.link.budget import Budgets
from uplimit.link.ledger import open_ledger


def test_raise_reopens_an_exhausted_ledger_and_is_audited(tmp_path):
    path = str(tmp_path / "ledger.db")
    ledger = open_ledger(path, Budgets(1000))
    ledger.charge(900)
    with pytest.raises(BudgetExhausted):
        ledger.charge(200)  # latches the ledger shut
    ledger.close()

    runner = CliRunner()
    out = runner.invoke(
        app, ["budget", "raise", "--ledger", path, "--lifetime", "5000", "--who", "alice",
              "--reason", "more users"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    ledger = open_ledger(path)
    try:
        assert ledger.usage().budgets.lifetime_bytes == 5000
        assert ledger.usage().exhausted_by is None
        (change,) = ledger.budget_changes()
        assert (change.who, change.reason, change.old.lifetime_bytes) == (
            "alice",
            "more users",
            1000,
        )
        ledger.charge(200)  # open again
    finally:
        ledger.close()
    shown = runner.invoke(app, ["budget", "show", "--ledger", path])
    assert "5,000 / 1,100" in shown.output


def test_a_budget_below_what_was_charged_is_refused(tmp_path):
    path = str(tmp_path / "ledger.db")
    ledger = open_ledger(path, Budgets(1000))
    ledger.charge(600)
    ledger.close()
    out = CliRunner().invoke(
        app, ["budget", "raise", "--ledger", path, "--lifetime", "100", "--who", "a",
              "--reason", "b"],
    )  # fmt: skip
    assert isinstance(out.exception, ConfigError)


def test_init_creates_the_ledger_from_the_config_once(tmp_path):
    path = tmp_path / "ledger.db"
    config = tmp_path / "uplimit.toml"
    config.write_text(f'[link]\nledger = "{path}"\nlifetime_budget_bytes = 5000\n')
    runner = CliRunner()
    out = runner.invoke(app, ["budget", "init", "--config", str(config)])
    assert out.exit_code == 0, out.output
    ledger = open_ledger(path)
    state = ledger.usage()
    ledger.close()
    assert state.budgets == Budgets(5000) and state.ledger_id in out.output
    again = runner.invoke(app, ["budget", "init", "--config", str(config)])
    assert isinstance(again.exception, ConfigError) and "already initialised" in str(
        again.exception
    )
    shown = runner.invoke(app, ["budget", "show", "--ledger", str(path)])
    assert state.ledger_id in shown.output
