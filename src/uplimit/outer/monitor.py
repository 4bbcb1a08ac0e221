"""Per-stream bits/token monitor on the outer side: a stream that costs too much is an alarm.

What a stream's tokens cost to code under the weak model is exactly the information they
carry (`coding.codec.cost_bits`). Honest output costs little (well under a bit per token at
T = 0); a compromised inner that hides secret bits in its token choices must make the stream
cost at least as many extra bits as it hides. The decoder sees every token's exact cost, so
the outer can watch each stream's running total against an allowance

    allowed(n tokens) = slack_bits + bits_per_token * n

with one allowance for greedy streams and one for sampled ones. `calibrate` fits both on the
per-token costs of honest traffic (training prompts, never the evaluation set): the rate is a
high quantile of honest streams' mean cost times a margin, and the slack the largest amount by
which any honest prefix exceeded that rate, times the same margin. The first time a stream
passes its allowance the monitor raises one alarm for it (log at ERROR, `alarms`, `on_alarm`).

Memory is bounded while serving: a stream's running total is all the monitor keeps of it, and
`end` forgets it when it leaves the table; `alarms` keeps the latest `MAX_ALARMS_KEPT`
(`alarm_count` counts all). Per-token costs are kept only with `keep_traces`, for
calibration and the red team, which run bounded workloads.

What this bounds: an attacker that stays under the allowance on every stream can still move up
to `allowed(n) - honest cost` bits per stream (see docs/security.md), so the monitor lowers
the usable part of the budget; the budget stays the hard limit.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from uplimit.errors import ConfigError
from uplimit.wire.streams import StreamSpec

__all__ = [
    "Allowance",
    "BitsMonitor",
    "MonitorAlarm",
    "MonitorThresholds",
    "calibrate",
]

log = logging.getLogger(__name__)

MIN_STREAM_TOKENS = 8  # shorter honest streams say little about the rate
MIN_SLACK_BITS = 16.0  # a floor, so that one costly first token is never an alarm
MAX_ALARMS_KEPT = 1024  # for the status page; each alarm is also logged and counted


@dataclass(frozen=True)
class Allowance:
    slack_bits: float
    bits_per_token: float

    def limit(self, tokens: int) -> float:
        return self.slack_bits + self.bits_per_token * tokens


@dataclass(frozen=True)
class MonitorThresholds:
    greedy: Allowance
    sampled: Allowance

    def for_stream(self, spec: StreamSpec) -> Allowance:
        return self.greedy if spec.params.greedy else self.sampled

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MonitorThresholds:
        try:
            d = json.loads(Path(path).read_text())
            return cls(Allowance(**d["greedy"]), Allowance(**d["sampled"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read monitor thresholds {path}: {e}") from e


@dataclass(frozen=True)
class MonitorAlarm:
    at: float
    stream_id: int
    tokens: int
    bits: float
    limit: float

    def describe(self) -> str:
        return (
            f"stream {self.stream_id} cost {self.bits:.1f} bits in {self.tokens} tokens,"
            f" over its allowance of {self.limit:.1f}"
        )


@dataclass
class _StreamCost:
    greedy: bool
    tokens: int = 0
    bits: float = 0.0
    alarmed: bool = False
    costs: list[float] | None = None  # per token, with `keep_traces` only


class BitsMonitor:
    """Watches each open stream's coded cost; `thresholds=None` only records."""

    def __init__(
        self,
        thresholds: MonitorThresholds | None,
        *,
        keep_traces: bool = False,
        on_alarm: Callable[[MonitorAlarm], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.thresholds = thresholds
        self.keep_traces = keep_traces
        self.on_alarm = on_alarm
        self.clock = clock
        self.streams: dict[int, _StreamCost] = {}  # open streams
        self.alarms: deque[MonitorAlarm] = deque(maxlen=MAX_ALARMS_KEPT)
        self.alarm_count = 0
        self._ended_traces: list[tuple[bool, list[float]]] = []

    def add(self, spec: StreamSpec, bits: float) -> None:
        """One decoded token of `spec`'s stream cost `bits`."""
        s = self.streams.get(spec.stream_id)
        if s is None:
            s = _StreamCost(spec.params.greedy, costs=[] if self.keep_traces else None)
            self.streams[spec.stream_id] = s
        s.tokens += 1
        s.bits += bits
        if s.costs is not None:
            s.costs.append(bits)
        if self.thresholds is None or s.alarmed:
            return
        limit = self.thresholds.for_stream(spec).limit(s.tokens)
        if s.bits > limit:
            s.alarmed = True
            alarm = MonitorAlarm(self.clock(), spec.stream_id, s.tokens, s.bits, limit)
            self.alarms.append(alarm)
            self.alarm_count += 1
            log.error("ALARM bits: %s", alarm.describe())
            if self.on_alarm is not None:
                self.on_alarm(alarm)

    def end(self, stream_id: int) -> None:
        """The stream left the table: forget it (keeping its trace with `keep_traces`)."""
        s = self.streams.pop(stream_id, None)
        if s is not None and s.costs is not None:
            self._ended_traces.append((s.greedy, s.costs))

    def traces(self) -> list[tuple[bool, list[float]]]:
        """(greedy, per-token costs) of every stream seen: `calibrate`'s input."""
        if not self.keep_traces:
            raise ConfigError("this monitor keeps no traces (keep_traces=False)")
        open_ = [(s.greedy, list(s.costs or ())) for s in self.streams.values()]
        return [*self._ended_traces, *open_]


def calibrate(
    traces: Iterable[tuple[bool, Sequence[float]]],
    *,
    quantile: float = 0.99,
    margin: float = 1.25,
) -> MonitorThresholds:
    """Fit both allowances on honest traffic (module doc); each class needs honest streams."""
    by_class: dict[bool, list[Sequence[float]]] = {True: [], False: []}
    for greedy, costs in traces:
        if costs:
            by_class[greedy].append(costs)
    fitted = {}
    for greedy, streams in by_class.items():
        long = [c for c in streams if len(c) >= MIN_STREAM_TOKENS]
        if not long:
            kind = "greedy" if greedy else "sampled"
            raise ConfigError(f"no honest {kind} stream of {MIN_STREAM_TOKENS}+ tokens")
        rate = float(np.quantile([sum(c) / len(c) for c in long], quantile)) * margin
        excess = max(float(np.max(np.cumsum(c) - rate * np.arange(1, len(c) + 1))) for c in streams)
        slack = max(MIN_SLACK_BITS, margin * excess)
        fitted[greedy] = Allowance(math.ceil(slack * 100) / 100, math.ceil(rate * 1000) / 1000)
    return MonitorThresholds(greedy=fitted[True], sampled=fitted[False])
