"""One alarm record and one hook for whatever raises alarms on the link: the ledger (budget
exhausted or changed, recorded durably), the inner's link (downlink violations) and the
outer's (`wire.receiver.AlarmKind`). The bits/token monitor's alarms carry figures of their
own (`outer.monitor.MonitorAlarm`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Alarm", "AlarmHook", "raise_alarm"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alarm:
    at: float
    # "budget-exhausted" | "budget-changed" (ledger); "downlink", "stalled", "clock", "auth"
    # (inner); AlarmKind (outer)
    kind: str
    message: str
    link: str = ""  # the ledger's name for the link, when a ledger raised it
    seq: int | None = None  # the ledger's durable record of it


AlarmHook = Callable[[Alarm], None]  # must not raise


def raise_alarm(alarms: list[Alarm], hook: AlarmHook | None, kind: str, message: str) -> Alarm:
    """A link's alarm, now: kept in `alarms`, logged at ERROR, and given to `hook`."""
    alarm = Alarm(time.time(), kind, message)
    alarms.append(alarm)
    log.error("ALARM %s on the link: %s", kind, message)
    if hook is not None:
        hook(alarm)
    return alarm
