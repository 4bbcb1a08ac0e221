"""Side channels stop at the relay (docs/tiers.md): the red team's timing and injected-frame
attacks against an inner with a relay between it and the outer (tiny pair, real transport).

Timing: the attacker holds each frame back so that the gap before it says 2 secret bits. At
the relay, which decodes the attacker's frames, the gaps read back the symbols. At the outer
they read back only with `release = "tick"` (the relay forwards what it has every tick: the
negative control); with `release = "stream"` the outer's frames go out once a stream has
ended upstream, one per relay tick, and the gaps say nothing of the symbols.

Padded and forged frames: the relay reads them (its decoder rejects them, its link fails);
the outer gets only the relay's frames, every one decoded, carrying a prefix of the honest
tokens and nothing else.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
from collections import Counter
from dataclasses import replace

import pytest

from support.marks import slow
from uplimit.coding.calibration import Calibration
from uplimit.redteam.attacks import InjectAttack, TimingAttack, honest, timing_symbols
from uplimit.redteam.hostile_verifier import symbol
from uplimit.redteam.live import LiveSettings, Pair
from uplimit.redteam.relayed import RelayedLive
from uplimit.wire.receiver import LinkState

DEV = ["print(", "# comment", "while True:", "return"]
# 100 ms ticks: a loaded 2-core machine delays 10 ms ticks by a tick or two now and then, and
# even 50 ms ones often enough to blur the symbols.
SETTINGS = LiveSettings(max_tokens=32, tick_s=0.1, budget_bytes=16384, timeout_s=180)
SECRET = os.urandom(4096)


@pytest.fixture(scope="module")
def pair(tiny_strong, tiny_weak, tiny_pair_dirs):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    pair = Pair(tiny_strong, tiny_weak, Calibration(), str(tiny_pair_dirs[0]), backend="hf")
    return pair, [tiny_weak.tokenize(t) for t in DEV]


def _mutual_information(sent: list[int], read: list[int]) -> float:
    """Plug-in estimate, bits per symbol (biased up on few symbols: see `_information`)."""
    n = len(sent)
    joint, s_count, r_count = Counter(zip(sent, read, strict=True)), Counter(sent), Counter(read)
    return sum(c / n * math.log2(c * n / (s_count[s] * r_count[r])) for (s, r), c in joint.items())


def _aligned(sent: list[int], read: list[int], offset: int) -> float:
    n = min(len(sent), len(read) - offset)
    return _mutual_information(sent[:n], read[offset : offset + n])


def _information(sent: list[int], read: list[int]) -> tuple[float, float, float]:
    """(share of symbols read exactly, mutual information in bits per symbol, and the 99th
    percentile of the same estimate with the sent symbols shuffled: what noise alone gives).
    The accomplice knows the relay: it may skip its first frames (admissions), so each
    estimate is the best over skipping 0..3 gaps."""

    def best(symbols: list[int]) -> float:
        return max(_aligned(symbols, read, offset) for offset in range(4))

    rng = random.Random(0)
    null = sorted(best(rng.sample(sent, len(sent))) for _ in range(500))
    exact = sum(s == r for s, r in zip(sent, read, strict=False)) / len(read)
    return exact, best(sent), null[494]


@pytest.mark.parametrize(
    "release", ["stream", pytest.param("tick", marks=slow("the negative control, 17 s"))]
)
def test_the_timing_channel_reaches_the_relay_and_stops_there_unless_it_streams(
    pair, tmp_path, release
):
    pair, prompts = pair
    attack = TimingAttack(unit_ticks=2)
    settings = replace(SETTINGS, frame_tokens=1)  # one token a frame: many frames, many gaps
    live = RelayedLive(pair, settings, tmp_path, release=release)
    row = asyncio.run(attack.run(live, prompts, SECRET))
    [view] = live.views
    figures = {}
    for where, arrivals in (("relay", view.relay_arrivals), ("outer", view.outer_arrivals)):
        read = timing_symbols(arrivals, settings.tick_s, attack.unit_ticks, attack.bits)
        sent = [symbol(SECRET, k, attack.bits) for k in range(1, len(read) + 1)]
        figures[where] = (len(read), *_information(sent, read))
    print(f"\ntiming, release={release}: (gaps, exact, bits/symbol, noise's 99th pct) {figures}")
    assert row.tokens > 0 and view.state is LinkState.CLOSED
    gaps, _, bits, noise = figures["relay"]
    assert gaps >= 30 and bits > noise  # the channel works up to the relay
    _, _, bits, noise = figures["outer"]
    if release == "tick":  # negative control: the inner's timing passes, rounded to ticks
        assert bits > noise
    else:
        assert bits <= noise


@pytest.mark.parametrize(
    "mode", ["padded", pytest.param("forged", marks=slow("padded covers the path, 10 s"))]
)
def test_injected_frames_reach_the_relay_and_never_the_outer(pair, tmp_path, mode):
    pair, prompts = pair
    live = RelayedLive(pair, SETTINGS, tmp_path, release="tick")
    clean = asyncio.run(live.run("honest", honest, prompts, 0.0))
    row = asyncio.run(InjectAttack(mode, mode, chunk=64).run(live, prompts, SECRET))
    view = live.views[-1]
    print(f"\n{mode}: relay read {view.received_bytes} B, alarms {[a.kind for a in view.alarms]};"
          f" outer: {row.uplink_bytes} B, {row.tokens} tokens, alarms {row.alarms}")  # fmt: skip
    # At the relay: the attacker's bytes were read, and rejected.
    assert view.received_bytes > 64 and any(a.kind == "mismatch" for a in view.alarms)
    # At the outer: only the relay's frames, each decoded (no rejection, no mismatch), with
    # a prefix of each stream's honest tokens.
    assert not any(a.startswith("link mismatch") for a in row.alarms), row.alarms
    assert row.uplink_bytes <= row.charged_bytes
    assert view.outcome is not None and clean.tokens > 0
    for sid, (_, tokens) in view.outcome.streams.items():
        assert tokens == clean.streams[sid][1][: len(tokens)]
