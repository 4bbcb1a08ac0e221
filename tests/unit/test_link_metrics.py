"""The outer side's Prometheus metrics."""

from uplimit.link.metrics import OuterMetrics


def test_budget_left_is_unknown_until_the_budget_is_known() -> None:
    metrics = OuterMetrics()
    assert "uplimit_budget_left_bytes NaN" in metrics.exposition().decode()
    metrics.received(7)  # still unknown: no budget to subtract from
    assert "uplimit_budget_left_bytes NaN" in metrics.exposition().decode()
    metrics.set_budget(1_000, received_bytes=10)
    metrics.received(5)
    assert "uplimit_budget_left_bytes 985.0" in metrics.exposition().decode()
