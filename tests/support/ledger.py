"""What every concurrency test of the ledger checks once the budget has run out."""

from __future__ import annotations

from uplimit.link.budget import Limit

__all__ = ["check_exhausted"]


def check_exhausted(ledger, budget: int, receipts: list[int], max_charge: int) -> None:
    state = ledger.usage()
    total = state.usage.lifetime_bytes
    assert total <= budget, f"overshoot by {total - budget} bytes"
    assert sum(receipts) == total, "a charge was lost or counted twice"
    assert state.charges == len(receipts) == len(ledger.charge_log())
    assert budget - total < max_charge  # refused only once the next charge did not fit
    assert state.exhausted_by is Limit.LIFETIME
