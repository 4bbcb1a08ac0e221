"""What the operator's status page shows (`GET /status`, `/status.json`), from the running outer.

`StatusBoard` samples the meters every `interval_s` into a bounded history (`history` samples:
an hour at the defaults) and keeps running totals of finished streams by temperature. Every
figure comes from the outer's own state or from the meters `uplimit meters` reads
(`link.agreement`); none is estimated here except the projection:

    rate       = (used at the newest sample - used at the oldest) / the time between them
    exhausted  = newest sample's time + left / rate       (None while the rate is 0)

"used" is the inner's ledger total (wire + timing bytes) when the outer can read the ledger
(one host, or a shared PostgreSQL budget), else the outer's receive counter: a lower bound of
what the ledger charged (`link.agreement`, check 1), so the projection is then optimistic and
the page says which source it used.

Per-key usage is not tracked: API keys come with issue #16; `snapshot()["keys"]` is None until
then.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uplimit.config import Config
from uplimit.errors import UplimitError
from uplimit.link.agreement import Readings, as_json, checks, figures, read_meters
from uplimit.link.metrics import OuterMetrics
from uplimit.outer.service import Choice, OuterService

__all__ = ["Alarm", "Sample", "StatusBoard", "status_meters"]

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0
DEFAULT_HISTORY = 720  # samples: an hour at 5 s; ~100 bytes each


@dataclass(frozen=True)
class Alarm:
    at: float
    kind: str
    message: str


@dataclass(frozen=True)
class Sample:
    at: float
    received_bytes: int  # the outer's receive counter
    used_bytes: int  # charged to the budget: the ledger's total, else `received_bytes`


@dataclass
class _Totals:
    streams: int = 0
    tokens: int = 0
    bits: float = 0.0


class StatusBoard:
    """The status page's state (module doc). `read_meters()` reads the meters that exist
    (blocking: it runs in a thread); `alarms()` lists every alarm raised so far."""

    def __init__(
        self,
        service: OuterService,
        read_meters: Callable[[], Readings],
        alarms: Callable[[], list[Alarm]],
        *,
        budget_bytes: int | None = None,
        metrics: OuterMetrics | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        history: int = DEFAULT_HISTORY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.read_meters = read_meters
        self.alarms = alarms
        self.budget_bytes = budget_bytes  # the configured lifetime budget; None: unknown here
        self.metrics = metrics
        self.interval_s = interval_s
        self.clock = clock
        self.samples: deque[Sample] = deque(maxlen=history)
        self.readings = Readings()
        self.meter_error: str | None = None
        self._by_temperature: dict[float, _Totals] = {}
        self._task: asyncio.Task[None] | None = None

    def stream_ended(self, choice: Choice) -> None:
        """A stream left the table: count its uploaded tokens and the uplink bits they cost
        (a stream cancelled before its first token says nothing about bits/token)."""
        if not choice.received:
            return
        temperature = round(choice.request.spec.params.temperature, 3)
        t = self._by_temperature.setdefault(temperature, _Totals())
        t.streams += 1
        t.tokens += choice.received
        t.bits += choice.bits

    def _read(self) -> Readings | None:
        """Read the meters (blocking); None, and the error kept for the page, on failure."""
        try:
            readings = self.read_meters()
        except (UplimitError, OSError) as e:  # a meter gone or unreadable: say so, keep going
            self.meter_error = str(e)
            return None
        self.meter_error = None
        return readings

    def record(self, readings: Readings) -> Sample:
        """Append a sample of `readings` (on the event loop, where the page reads them)."""
        self.readings = readings
        received = readings.received or 0
        ledger = readings.ledger
        used = ledger.usage.lifetime_bytes if ledger is not None else received
        s = Sample(self.clock(), received, used)
        self.samples.append(s)
        if self.metrics is not None:
            found = checks(readings)  # none with fewer than two meters: agreement unknown
            agree = float(all(c.ok for c in found)) if found else float("nan")
            self.metrics.meters_agree.set(agree)
            for meter, value in _meter_bytes(readings):
                self.metrics.meter_bytes.labels(meter).set(value)
        return s

    async def _run(self) -> None:
        while True:
            try:
                readings = await asyncio.to_thread(self._read)
                if readings is not None:  # a failed read is no sample: it would read as 0
                    self.record(readings)
            except Exception:  # the page must never take the outer down
                log.exception("status: sampling failed")
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # --- what the page shows ----------------------------------------------------------------

    def budget(self) -> dict[str, Any]:
        ledger = self.readings.ledger
        lifetime = ledger.budgets.lifetime_bytes if ledger is not None else self.budget_bytes
        last = self.samples[-1] if self.samples else None
        used = last.used_bytes if last is not None else None
        left = lifetime - used if lifetime is not None and used is not None else None
        rate = None
        if len(self.samples) >= 2:
            first = self.samples[0]
            rate = (last.used_bytes - first.used_bytes) / max(last.at - first.at, 1e-9)
        exhausts_at = None
        if left is not None and rate:
            exhausts_at = last.at + max(left, 0) / rate
        return {
            "source": "ledger" if ledger is not None else "receive counter",
            "lifetime_bytes": lifetime,
            "used_bytes": used,
            "left_bytes": left,
            "rate_bytes_per_s": rate,
            "exhausts_at": exhausts_at,
        }

    def uplink(self) -> list[dict[str, float]]:
        """Uplink bits/s between consecutive samples, at the later one's time."""
        return [
            {"at": b.at, "bits_per_s": 8 * (b.received_bytes - a.received_bytes) / (b.at - a.at)}
            for a, b in itertools.pairwise(self.samples)
            if b.at > a.at
        ]

    def snapshot(self) -> dict[str, Any]:
        """Everything `/status.json` returns and `/status` draws."""
        found = checks(self.readings)
        budget = self.budget()
        return {
            "at": self.clock(),
            "interval_s": self.interval_s,
            "link": {"state": self.service.state.value, "reason": self.service.uplink.reason},
            "streams": self.service.active_streams(),
            "budget": budget,
            "burndown": [
                {"at": s.at, "left_bytes": budget["lifetime_bytes"] - s.used_bytes}
                for s in self.samples
            ]
            if budget["lifetime_bytes"] is not None
            else [],
            "uplink": self.uplink(),
            "bits_per_token": [
                {
                    "temperature": temp,
                    "streams": t.streams,
                    "tokens": t.tokens,
                    "bits": t.bits,
                    "bits_per_token": t.bits / t.tokens,
                }
                for temp, t in sorted(self._by_temperature.items())
            ],
            "meters": {
                "figures": [list(row) for row in figures(self.readings)],
                "bytes": [{"meter": m, "bytes": b} for m, b in _meter_bytes(self.readings)],
                "error": self.meter_error,
                "checks": as_json(self.readings, found)["checks"],
                "agree": all(c.ok for c in found) if found else None,  # None: nothing to compare
            },
            "alarms": [
                {"at": a.at, "kind": a.kind, "message": a.message}
                for a in sorted(self.alarms(), key=lambda a: a.at, reverse=True)
            ],
            "keys": None,  # per-key usage: issue #16 (module doc)
        }


def status_meters(config: Config) -> Callable[[], Readings]:
    """The meters this outer can read, as `uplimit meters` reads them: its receive counter;
    the inner's ledger when it is on this host or a shared PostgreSQL; the kernel meter named
    by `[outer] kernel_meter` (root, same host)."""
    ledger = config.link.ledger or str(config.path("", "ledger.db"))
    received = config.path(config.link.receive_counter, "received.db")
    kernel = config.outer.kernel_meter or None

    def read() -> Readings:
        is_url = ledger.startswith(("postgresql://", "postgres://"))
        return read_meters(
            ledger=ledger if is_url or Path(ledger).is_file() else None,
            received=received,
            kernel=kernel,
        )

    return read


def _meter_bytes(r: Readings) -> list[tuple[str, int]]:
    """The comparable figure of each meter that was read: bytes that crossed the uplink."""
    out = []
    if r.ledger is not None:
        out.append(("ledger", r.ledger.wire_bytes))
    if r.received is not None:
        out.append(("received", r.received))
    if r.kernel is not None:
        out.append(("kernel", r.kernel.tcp_payload_bytes))
    return out
