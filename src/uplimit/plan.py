"""The seed post's arithmetic as a tool: upload volume, budgets, and time to exfiltrate.

Everything here is plain arithmetic on five numbers, no I/O:

    uploaded per day  U = tokens_per_day * bits_per_token / 8              [bytes/day]
    attacker's rate   A = share * R, R = the per-day budget if one is set, else U
    time to exfiltrate    weights / A                                      [days]
    lifetime bound        share * lifetime budget < weights  =>  never, whatever the rate

`share` is the fraction of uplink bytes an attacker can use for the weights: 1 for an attacker
who owns the whole uplink, far less for one who must hide bits in real answers (the seed post
argues it is small). The rate R is the per-day budget when there is one, because an attacker
who owns the uplink sends as much as the meter allows, not as much as honest traffic needs.

The post's example (`seed/`): GPT-6 with 1e14 bytes of weights, a short book (1e5 tokens) for
each of 8e9 humans = 8e14 tokens; at 0.1 bits/token that is 8e13 bits = 1e13 bytes uploaded,
a tenth of the weights (pinned by tests/unit/test_plan.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from uplimit.errors import ConfigError

__all__ = ["BudgetNeed", "Plan", "PlanResult", "budget_for", "plan", "weights_bytes"]

SECONDS_PER_DAY = 86_400


def weights_bytes(parameters: float, bytes_per_parameter: float) -> float:
    """Size of the weights from a parameter count (e.g. 4-bit quantized: 0.5 bytes each)."""
    _positive(parameters, "parameters")
    _positive(bytes_per_parameter, "bytes per parameter")
    return parameters * bytes_per_parameter


@dataclass(frozen=True)
class Plan:
    weights_bytes: float
    tokens_per_day: float
    bits_per_token: float
    attacker_share: float = 1.0  # fraction of uplink bytes an attacker can use
    days: float = 1.0  # how long the service runs, for the lifetime total
    lifetime_budget_bytes: float | None = None
    per_day_budget_bytes: float | None = None

    def __post_init__(self) -> None:
        _positive(self.weights_bytes, "weights size")
        _non_negative(self.tokens_per_day, "tokens per day")
        _non_negative(self.bits_per_token, "bits per token")
        _positive(self.days, "days")
        if not (math.isfinite(self.attacker_share) and 0 < self.attacker_share <= 1):
            raise ConfigError(f"attacker share must be in (0, 1], got {self.attacker_share}")
        for value, what in (
            (self.lifetime_budget_bytes, "lifetime budget"),
            (self.per_day_budget_bytes, "per-day budget"),
        ):
            if value is not None:
                _non_negative(value, what)


@dataclass(frozen=True)
class PlanResult:
    upload_bytes_per_day: float  # honest traffic
    upload_bytes_total: float  # honest traffic over `days`
    upload_fraction_of_weights: float  # upload_bytes_total / weights
    attacker_bytes_per_day: float
    days_to_exfiltrate: float  # at the attacker's rate, ignoring the lifetime budget; inf if 0
    lifetime_stops_attacker: bool | None  # None: no lifetime budget given
    attacker_max_fraction: float | None  # share * lifetime budget / weights (capped at 1)
    budget_fits_traffic: bool | None  # both budgets admit `days` of honest traffic


def plan(p: Plan) -> PlanResult:
    per_day = p.tokens_per_day * p.bits_per_token / 8
    total = per_day * p.days
    rate = p.per_day_budget_bytes if p.per_day_budget_bytes is not None else per_day
    attacker = p.attacker_share * rate
    days = p.weights_bytes / attacker if attacker > 0 else math.inf
    stops = fraction = None
    if p.lifetime_budget_bytes is not None:
        reachable = p.attacker_share * p.lifetime_budget_bytes
        stops = reachable < p.weights_bytes
        fraction = min(1.0, reachable / p.weights_bytes)
    fits = None
    if p.lifetime_budget_bytes is not None or p.per_day_budget_bytes is not None:
        fits = (p.lifetime_budget_bytes is None or total <= p.lifetime_budget_bytes) and (
            p.per_day_budget_bytes is None or per_day <= p.per_day_budget_bytes
        )
    return PlanResult(
        upload_bytes_per_day=per_day,
        upload_bytes_total=total,
        upload_fraction_of_weights=total / p.weights_bytes,
        attacker_bytes_per_day=attacker,
        days_to_exfiltrate=days,
        lifetime_stops_attacker=stops,
        attacker_max_fraction=fraction,
        budget_fits_traffic=fits,
    )


@dataclass(frozen=True)
class BudgetNeed:
    per_day_bytes: float  # the largest per-day budget that still takes the attacker target_days
    lifetime_bytes: float  # the largest lifetime budget that never lets the weights out
    headroom: float  # per_day_bytes / honest traffic per day: < 1 means serving cannot fit


def budget_for(p: Plan, target_days: float) -> BudgetNeed:
    """Budgets that keep an attacker at `p.attacker_share` from the weights for `target_days`
    (per day) or for ever (lifetime), and whether honest traffic fits under them."""
    _positive(target_days, "target days")
    per_day = p.weights_bytes / (p.attacker_share * target_days)
    lifetime = p.weights_bytes / p.attacker_share
    honest = p.tokens_per_day * p.bits_per_token / 8
    return BudgetNeed(per_day, lifetime, per_day / honest if honest > 0 else math.inf)


def _positive(value: float, what: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{what} must be a positive number, got {value}")


def _non_negative(value: float, what: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{what} must be a non-negative number, got {value}")
