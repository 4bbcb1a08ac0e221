"""`uplimit plan`: the seed post's arithmetic, reproduced."""

from __future__ import annotations

import math

import pytest

from uplimit.errors import ConfigError
from uplimit.plan import Plan, budget_for, plan, weights_bytes

# The post: GPT-6 weights 1e14 bytes; a 1e5-token book for each of 8e9 humans.
GPT6_WEIGHTS = 1e14
BOOKS = 1e5 * 8e9


def test_seed_post_example():
    assert BOOKS == 8e14
    r = plan(Plan(GPT6_WEIGHTS, tokens_per_day=BOOKS, bits_per_token=0.1))
    assert r.upload_bytes_total == pytest.approx(1e13)  # "1e13 bytes uploaded vs 1e14"
    assert r.upload_fraction_of_weights == pytest.approx(0.1)


def test_same_total_spread_over_six_months():
    days = 182.5
    r = plan(Plan(GPT6_WEIGHTS, tokens_per_day=BOOKS / days, bits_per_token=0.1, days=days))
    assert r.upload_bytes_total == pytest.approx(1e13)
    # An attacker owning the whole uplink at the honest rate needs ten times the period.
    assert r.days_to_exfiltrate == pytest.approx(10 * days)


def test_attacker_share_and_per_day_budget():
    p = Plan(1e12, tokens_per_day=8e12, bits_per_token=1.0, attacker_share=0.01)
    r = plan(p)
    assert r.upload_bytes_per_day == 1e12
    assert r.attacker_bytes_per_day == pytest.approx(1e10)
    assert r.days_to_exfiltrate == pytest.approx(100)
    # With a per-day budget the attacker's rate is the budget's, not the traffic's.
    r = plan(Plan(1e12, 8e12, 1.0, attacker_share=1.0, per_day_budget_bytes=2e12))
    assert r.days_to_exfiltrate == pytest.approx(0.5)
    assert r.budget_fits_traffic is True


def test_lifetime_budget_stops_the_attacker():
    r = plan(Plan(1e9, 1e6, 0.5, lifetime_budget_bytes=1e7, days=10))
    assert r.lifetime_stops_attacker is True
    assert r.attacker_max_fraction == pytest.approx(0.01)
    assert r.upload_bytes_total == pytest.approx(625_000)
    assert r.budget_fits_traffic is True
    r = plan(Plan(1e9, 1e6, 0.5, lifetime_budget_bytes=2e9))
    assert r.lifetime_stops_attacker is False
    assert r.attacker_max_fraction == 1.0


def test_budget_for_a_target_time():
    p = Plan(GPT6_WEIGHTS, tokens_per_day=BOOKS / 365, bits_per_token=0.1, attacker_share=0.1)
    need = budget_for(p, target_days=365 * 10)
    # An attacker using 10 % of the uplink needs ten years at this per-day budget.
    assert need.per_day_bytes == pytest.approx(1e14 / (0.1 * 3650))
    assert plan(Plan(p.weights_bytes, p.tokens_per_day, p.bits_per_token, 0.1,
                     per_day_budget_bytes=need.per_day_bytes)).days_to_exfiltrate == (
        pytest.approx(3650)
    )  # fmt: skip
    assert need.lifetime_bytes == pytest.approx(1e15)
    honest = BOOKS / 365 * 0.1 / 8
    assert need.headroom == pytest.approx(need.per_day_bytes / honest)


def test_weights_from_parameters():
    assert weights_bytes(1.5e9, 0.5) == 7.5e8


def test_no_traffic_means_never():
    assert math.isinf(plan(Plan(1e9, 0, 0.1)).days_to_exfiltrate)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weights_bytes": 0},
        {"bits_per_token": -1},
        {"attacker_share": 0},
        {"attacker_share": 1.5},
        {"days": 0},
        {"lifetime_budget_bytes": -5},
        {"tokens_per_day": math.nan},
    ],
)
def test_bad_inputs(kwargs):
    base = {"weights_bytes": 1e9, "tokens_per_day": 1e6, "bits_per_token": 0.5}
    with pytest.raises(ConfigError):
        Plan(**{**base, **kwargs})


def test_plan_command_prints_the_seed_post_example():
    from typer.testing import CliRunner

    from uplimit.cli import app

    args = ["plan", "--weights-bytes", "1e14", "--tokens-per-day", "8e14"]
    result = CliRunner().invoke(app, [*args, "--bits-per-token", "0.1", "--days", "1"])
    assert result.exit_code == 0, result.output
    assert "1e+13 bytes (10 % of the weights)" in result.output
