"""The bits/token monitor (outer/monitor.py): calibration and alarms, sans-IO."""

from __future__ import annotations

import pytest

from uplimit.coding.sampling import SamplingParams
from uplimit.errors import ConfigError
from uplimit.outer.monitor import (
    MAX_ALARMS_KEPT,
    MIN_SLACK_BITS,
    Allowance,
    BitsMonitor,
    MonitorThresholds,
    calibrate,
)
from uplimit.wire.streams import StreamSpec

GREEDY = StreamSpec(0, (1, 2), SamplingParams(), 0, 64)
SAMPLED = StreamSpec(1, (1, 2), SamplingParams(temperature=0.7), 5, 64)


def test_calibration_passes_every_honest_prefix():
    honest = [(True, [0.2, 3.0, 0.1] + [0.3] * 20), (True, [0.5] * 30)]
    honest += [(False, [1.0, 0.2] * 12), (False, [0.6] * 10)]
    th = calibrate(honest)
    assert th.greedy.bits_per_token == pytest.approx(0.5 * 1.25, abs=0.01)
    assert th.greedy.slack_bits >= MIN_SLACK_BITS
    monitor = BitsMonitor(th)
    for i, (greedy, costs) in enumerate(honest):
        spec = StreamSpec(i, (1,), SamplingParams(temperature=0 if greedy else 0.7), 0, 64)
        for c in costs:
            monitor.add(spec, c)
    assert not monitor.alarms and monitor.alarm_count == 0


def test_a_costly_stream_raises_one_alarm_when_it_passes_its_allowance():
    th = MonitorThresholds(Allowance(16.0, 0.5), Allowance(16.0, 1.0))
    seen = []
    monitor = BitsMonitor(th, on_alarm=seen.append, clock=lambda: 42.0)
    for _ in range(20):
        monitor.add(SAMPLED, 1.0)  # exactly at the sampled rate: never over
    for _ in range(11):
        assert not seen
        monitor.add(GREEDY, 2.0)  # 1.5 bits/token over the greedy rate
    # 16 + 0.5 n < 2 n first at n = 11
    assert len(seen) == 1 and seen[0].tokens == 11 and seen[0].stream_id == 0 and seen[0].at == 42.0
    for _ in range(5):
        monitor.add(GREEDY, 9.0)
    assert len(monitor.alarms) == 1  # one alarm per stream


def test_recording_only_and_round_trip(tmp_path):
    monitor = BitsMonitor(None, keep_traces=True)
    monitor.add(GREEDY, 100.0)
    monitor.add(SAMPLED, 1.0)
    monitor.end(SAMPLED.stream_id)  # a trace outlives its stream
    assert not monitor.alarms and sorted(monitor.traces()) == [(False, [1.0]), (True, [100.0])]
    with pytest.raises(ConfigError):
        BitsMonitor(None).traces()
    th = MonitorThresholds(Allowance(16.5, 0.25), Allowance(20.0, 1.5))
    th.save(tmp_path / "t.json")
    assert MonitorThresholds.load(tmp_path / "t.json") == th
    with pytest.raises(ConfigError):
        MonitorThresholds.load(tmp_path / "missing.json")


def test_a_serving_monitor_forgets_ended_streams_and_keeps_the_latest_alarms():
    th = MonitorThresholds(Allowance(16.0, 0.5), Allowance(16.0, 1.0))
    monitor = BitsMonitor(th)
    n = MAX_ALARMS_KEPT + 10
    for i in range(n):
        spec = StreamSpec(i, (1,), SamplingParams(temperature=0), 0, 64)
        for _ in range(12):
            monitor.add(spec, 2.0)  # over at the 11th token: one alarm each
        monitor.end(i)
    assert not monitor.streams  # nothing kept of ended streams
    assert monitor.alarm_count == n and len(monitor.alarms) == MAX_ALARMS_KEPT
    assert monitor.alarms[-1].stream_id == n - 1


def test_calibration_needs_both_kinds_of_traffic():
    with pytest.raises(ConfigError, match="sampled"):
        calibrate([(True, [0.1] * 20)])


def test_serve_outer_turns_the_monitor_on_from_config_and_counts_its_alarms(tmp_path):
    from uplimit.config import load_config
    from uplimit.link.metrics import OuterMetrics
    from uplimit.outer.serve import configured_monitor

    metrics = OuterMetrics()
    assert configured_monitor(load_config(None, env={}), metrics) is None  # off by default
    MonitorThresholds(Allowance(16.0, 0.5), Allowance(16.0, 1.0)).save(tmp_path / "t.json")
    config = load_config(None, env={"UPLIMIT_OUTER_MONITOR": str(tmp_path / "t.json")})
    monitor = configured_monitor(config, metrics)
    for _ in range(12):
        monitor.add(GREEDY, 2.0)
    assert len(monitor.alarms) == 1
    assert 'uplimit_alarms_total{kind="bits"} 1.0' in metrics.exposition().decode()
    bad = load_config(None, env={"UPLIMIT_OUTER_MONITOR": str(tmp_path / "none.json")})
    with pytest.raises(ConfigError, match="monitor thresholds"):
        configured_monitor(bad, metrics)
