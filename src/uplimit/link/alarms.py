"""One alarm record and one hook for whatever raises alarms on the link: the ledger (budget
exhausted or changed, recorded durably), the inner's link (downlink violations) and the
outer's (`wire.receiver.AlarmKind`). The bits/token monitor's alarms carry figures of their
own (`outer.monitor.MonitorAlarm`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Alarm", "AlarmHook"]


@dataclass(frozen=True)
class Alarm:
    at: float
    kind: str  # "budget-exhausted" | "budget-changed" (ledger); "downlink" (inner); AlarmKind
    message: str
    link: str = ""  # the ledger's name for the link, when a ledger raised it
    seq: int | None = None  # the ledger's durable record of it


AlarmHook = Callable[[Alarm], None]  # must not raise
