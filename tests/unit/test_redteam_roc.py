"""`uplimit roc`'s analysis on synthetic traces: held-out scoring, the curve, the table."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from uplimit.redteam.roc import (
    RATES,
    TEMPERATURES,
    RocSettings,
    StreamTrace,
    analyse,
    caught,
    curve,
    excess,
    markdown,
    plot_roc,
    read_traces,
    score,
)

SETTINGS = RocSettings(prompts=100, stego_prompts=40, max_tokens=32)


def traces(extra_bits: float) -> list[StreamTrace]:
    """Honest streams cost ~0.3 bits/token; stego streams `extra_bits` x rate more."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(SETTINGS.prompts):
        for t in TEMPERATURES:
            for rate in (0.0, *RATES) if i < SETTINGS.stego_prompts else (0.0,):
                costs = rng.exponential(0.3, 32) + extra_bits * rate
                hidden = round(rate * 32)
                out.append(
                    StreamTrace(f"T{t}/r{rate}/p{i}", t, rate, hidden,
                                int(hidden > 0), [float(c) for c in costs])
                )  # fmt: skip
    return out


def test_excess_is_the_largest_prefix_excess() -> None:
    assert excess([5.0, 0.0, 0.0], 1.0) == 4.0
    assert excess([0.0, 0.0, 9.0], 1.0) == 6.0


def test_scores_come_from_thresholds_fitted_without_the_streams_prompt() -> None:
    # A prompt whose honest streams cost far more would raise every threshold fitted on them:
    # its own streams must not be scored against those.
    costly = [
        StreamTrace(t.key, t.temperature, t.rate, t.hidden_bits, t.deviated,
                    [c + 50 * (t.key.endswith("/p0") and t.rate == 0) for c in t.costs])
        for t in traces(20.0)
    ]  # fmt: skip
    scored = score(costly)
    p0 = [s for t in TEMPERATURES for s in scored[t][:1]]  # the first trace: p0's honest
    assert costly[0].key == "T0.0/r0.0/p0" and all(s.score > s.slack for s in p0)
    others = [s for t in TEMPERATURES for s in scored[t][1:] if s.rate == 0]
    assert sum(s.score > s.slack for s in others) <= len(others) // 20  # the rest: as fitted


def test_spot_check_catches_deviating_streams_at_its_rate() -> None:
    scored = score(traces(0.0))[0.7]
    s = next(s for s in scored if s.rate == 0.5)
    assert s.deviated
    assert caught(s, np.inf, 0.05) == pytest.approx(0.05)
    assert caught(s, -np.inf, 0.05) == 1.0


def test_curve_and_table() -> None:
    data = traces(20.0)  # 0.05 bits/token -> +1 bit/token: far above honest traffic
    scored = score(data)[0.0]
    points = curve(scored, 0.5, 0.0)
    assert points[0] == (0.0, 0.0) and points[-1] == (1.0, 1.0)
    assert all(b[1] >= a[1] for a, b in itertools.pairwise(points))
    result = analyse(data, SETTINGS, [0.05, 1.0])
    rows = result["rows"]
    assert len(rows) == len(RATES) * len(TEMPERATURES)
    assert markdown(result).count("\n") == 2 + len(rows)
    for row in rows:
        assert row["best at <= 1 % false alarms, spot-check 0.05"] >= 0.99
        assert row["caught with spot-check 1"] == 1.0


def test_undetectable_streams_are_caught_at_the_check_rate() -> None:
    rows = analyse(traces(0.0), SETTINGS, [0.05])["rows"]
    for row in rows:
        assert row["caught by monitor as fitted"] <= 0.05
        assert row["caught with spot-check 0.05"] == pytest.approx(
            row["caught by monitor as fitted"] + 0.05 * (1 - row["caught by monitor as fitted"]),
            abs=0.02,
        )
        assert row["check rate for 99 %"] >= 0.9


def test_traces_round_trip_and_a_cut_line_is_dropped(tmp_path) -> None:
    data = traces(1.0)[:3]
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(t.__dict__) + "\n" for t in data) + '{"key": "T0')
    assert read_traces(path) == data


def test_plot(tmp_path) -> None:
    plot_roc(traces(5.0), SETTINGS, 0.05, tmp_path / "roc.png")
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
