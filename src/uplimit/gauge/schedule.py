"""When to re-gauge the serving copy, which gauge to apply, and the audit of what served when.

`GaugeSchedule` is sans-IO arithmetic: time is cut into epochs of `period_s` seconds from
`origin`; epoch e's gauge seed is HMAC-SHA256(secret, "seed" || e). The inner side applies
`random_gauge(config, schedule.seed(e))` to the *current* serving copy at the start of epoch e
(gauges compose; a product of uniform draws is uniform, and permutations are exact in storage,
so nothing drifts). The secret must live with the process that applies gauges and nowhere near
the weights: whoever reads it reads every gauge (8 bytes per epoch to upload, see docs/gauge.md).

`GaugeAudit` is the I/O shell: an append-only JSONL file of `GaugeRecord`s, one per epoch
applied, each with a public `gauge_id` (not the seed) and the sha256 of the weights that served.
`serving_at(t)` answers "which gauge served a request made at time t".

`uplimit.inner.rotation.GaugeRotation` runs this on the inner side (llama.cpp serving copies
written by `gauge.export`); in outline:

    schedule = GaugeSchedule(secret, period_s=6 * 3600)
    epoch = schedule.epoch(time.time())
    if audit.latest() is None or audit.latest().epoch < epoch:
        gauge_gguf(current_copy, next_copy, schedule.seed(epoch))
        ... swap the serving copy ...
        audit.record(GaugeRecord(epoch, schedule.gauge_id(epoch), weights_sha256, time.time()))
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from uplimit.errors import ConfigError

# Fewer secret bytes would make the seeds guessable.
_MIN_SECRET_BYTES = 16


@dataclass(frozen=True)
class GaugeSchedule:
    """Epoch e covers [origin + e * period_s, origin + (e + 1) * period_s)."""

    secret: bytes
    period_s: float
    origin: float = 0.0

    def __post_init__(self) -> None:
        if len(self.secret) < _MIN_SECRET_BYTES:
            raise ConfigError(f"gauge secret needs at least {_MIN_SECRET_BYTES} bytes")
        if not (math.isfinite(self.period_s) and self.period_s > 0):
            raise ConfigError(f"period must be a positive number of seconds, got {self.period_s}")

    def epoch(self, now: float) -> int:
        """The epoch that `now` (unix seconds) falls in; ConfigError before the origin."""
        if now < self.origin:
            raise ConfigError(f"time {now} is before the schedule's origin {self.origin}")
        return math.floor((now - self.origin) / self.period_s)

    def starts(self, epoch: int) -> float:
        """When `epoch` begins (unix seconds)."""
        return self.origin + epoch * self.period_s

    def seed(self, epoch: int) -> int:
        """Epoch's gauge seed, 64 bits: secret, so never write it to the audit or the weights."""
        return int.from_bytes(self._mac(b"seed", epoch)[:8], "big")

    def gauge_id(self, epoch: int) -> str:
        """Epoch's public name for audit records: reveals nothing about the seed."""
        return self._mac(b"id", epoch)[:16].hex()

    def _mac(self, purpose: bytes, epoch: int) -> bytes:
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        return hmac.new(self.secret, purpose + epoch.to_bytes(8, "big"), hashlib.sha256).digest()


@dataclass(frozen=True)
class GaugeRecord:
    """One re-gauge: from `started_at` on, weights with `weights_sha256` served under it.

    `applied_to` is the sha256 of the weights the gauge was applied to (the previous serving
    copy, or the master for the first): with it the chain of copies can be re-derived from
    the master and the schedule's secret. "" where unknown.
    """

    epoch: int
    gauge_id: str
    weights_sha256: str
    started_at: float
    applied_to: str = ""


class GaugeAudit:
    """Append-only JSONL log of `GaugeRecord`s; each append is fsync'd before it returns.

    A crash mid-append leaves at most a torn last line (no newline), which reading ignores and
    the next append overwrites. Epochs and start times must increase (ConfigError otherwise).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ConfigError(f"directory {self.path.parent} does not exist")

    def records(self) -> list[GaugeRecord]:
        """Every complete record, oldest first."""
        if not self.path.exists():
            return []
        lines = self.path.read_bytes().split(b"\n")[:-1]  # the last piece is "" or torn
        try:
            return [GaugeRecord(**json.loads(line)) for line in lines]
        except (json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"{self.path}: corrupt gauge audit ({e})") from e

    def latest(self) -> GaugeRecord | None:
        records = self.records()
        return records[-1] if records else None

    def record(self, rec: GaugeRecord) -> None:
        last = self.latest()
        if last is not None and (rec.epoch <= last.epoch or rec.started_at < last.started_at):
            raise ConfigError(f"record for epoch {rec.epoch} does not follow epoch {last.epoch}")
        line = json.dumps(asdict(rec), sort_keys=True).encode() + b"\n"
        created = not self.path.exists()
        with self.path.open("a+b") as f:
            f.truncate(self._complete_length())  # drop a torn line left by a crash
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if created:  # the new directory entry must be durable too
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def serving_at(self, t: float) -> GaugeRecord | None:
        """The record in force at time `t`: the last one started at or before it."""
        found = None
        for rec in self.records():
            if rec.started_at > t:
                break
            found = rec
        return found

    def _complete_length(self) -> int:
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        return data.rfind(b"\n") + 1
