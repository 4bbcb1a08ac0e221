"""The three independent upload meters side by side, and whether they agree (`uplimit meters`).

    ledger            inner: bytes charged before writing (wire bytes), plus the timing charge
    receive counter   outer: uplink bytes read (both connections: bytes the inner writes on
                      the downlink are uploads too)
    kernel quota      inner host: IP bytes that left the inner's namespace, by kind

Each check is a relation that holds whatever the protocol overhead, so any violation is a
disagreement to look into:

1. received <= ledger wire bytes. The sender charges every byte before writing it. The
   difference is what was charged and not received (frames in flight, a frame charged just
   before a crash): an over-charge, which is allowed.
2. kernel TCP payload <= ledger wire bytes. Payload that left the namespace without a charge
   was written around the meter. TCP retransmissions are counted again by the kernel:
   tolerate them with `slack_bytes`.
3. received <= kernel TCP payload. Bytes reached the outer without passing the kernel meter.
   Holds only if the namespace has existed as long as the receive counter (its counters start
   at zero when it is created): use one counter file per namespace.
4. ledger total (wire + timing) <= lifetime budget.
5. the kernel dropped nothing: a drop means something tried to send past the quota.
6. the kernel refused nothing: in a gated namespace (the relay's, `link.kernel.Gate`), a refusal
   means something tried to reach past its link and its served ports.

The known overhead is shown, never flagged: the IP and TCP headers of the packets that carried
payload (52 bytes each on Linux with timestamps), and apart from them the payload-free packets
the inner sends (ACKs for downlink traffic, SYN, FIN), which are uplink bytes at the kernel too.
So are a gated namespace's served bytes: its replies on connections opened into it, beside the
quota.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from uplimit.errors import ConfigError, LedgerError
from uplimit.link.kernel import KernelMeter, KernelReading
from uplimit.link.ledger import LedgerState, open_ledger

__all__ = ["Check", "Readings", "as_json", "checks", "figures", "read_meters", "read_received"]


@dataclass(frozen=True)
class Readings:
    """What each meter said; None where that meter was not read."""

    ledger: LedgerState | None = None
    received: int | None = None
    kernel: KernelReading | None = None
    kernel_name: str | None = None


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def read_received(path: str | Path, name: str = "uplink") -> int:
    """The receive counter's total, read-only (opening a `ReceiveCounter` would create a row
    for a mistyped name and report 0)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"receive counter {path} does not exist")
    try:
        db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            row = db.execute(
                "SELECT bytes FROM uplimit_received WHERE name = ?", (name,)
            ).fetchone()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise LedgerError(f"receive counter {path}: {e}") from e
    if row is None:
        raise ConfigError(f"receive counter {path} has no count named {name!r}")
    return int(row[0])


def read_meters(
    *,
    ledger: str | None = None,
    budget: str | None = None,
    received: str | Path | None = None,
    counter: str = "uplink",
    kernel: str | None = None,
) -> Readings:
    """Read the meters that are named: a ledger (file or URL, budget name), a receive counter
    file (count name), a kernel meter (its name: namespace uplimit-NAME)."""
    state = None
    if ledger is not None:
        is_url = ledger.startswith(("postgresql://", "postgres://"))
        if not is_url and not Path(ledger).is_file():
            raise ConfigError(f"ledger {ledger} does not exist")
        name = budget or ("global" if is_url else "link")
        opened = open_ledger(ledger, name=name)
        try:
            state = opened.usage()
        finally:
            opened.close()
    count = read_received(received, counter) if received is not None else None
    reading = KernelMeter(kernel, 1).read() if kernel is not None else None
    return Readings(state, count, reading, kernel)


def _n(value: int) -> str:
    return f"{value:,}"


def figures(r: Readings) -> list[tuple[str, str, str]]:
    """(meter, bytes, what else it says) rows for display."""
    rows = []
    if r.ledger is not None:
        s = r.ledger
        rows.append(
            (
                f"ledger (inner, budget {s.name!r})",
                _n(s.wire_bytes),
                f"wire bytes; + {_n(s.timing_bytes)} timing = {_n(s.usage.lifetime_bytes)}"
                f" charged of {_n(s.budgets.lifetime_bytes)} ({_n(s.charges)} charges"
                + (f"; exhausted: {s.exhausted_by.label}" if s.exhausted_by else "")
                + ")",
            )
        )
    if r.received is not None:
        rows.append(("receive counter (outer)", _n(r.received), "uplink bytes read"))
    if r.kernel is not None:
        k = r.kernel
        data_packets = k.sent_packets - k.ctl_packets - k.other_packets
        headers = k.sent_bytes - k.ctl_bytes - k.other_bytes - k.tcp_payload_bytes
        rows.append(
            (
                f"kernel (namespace uplimit-{r.kernel_name})",
                _n(k.tcp_payload_bytes),
                f"TCP payload; IP bytes {_n(k.sent_bytes)} in {_n(k.sent_packets)} packets",
            )
        )
        rows.append(
            (
                "  overhead: headers",
                _n(headers),
                f"IP+TCP headers of {_n(data_packets)} packets with payload",
            )
        )
        rows.append(
            (
                "  overhead: ACK/SYN/FIN",
                _n(k.ctl_bytes),
                f"{_n(k.ctl_packets)} payload-free packets (ACKs for downlink traffic)",
            )
        )
        if k.other_packets:
            rows.append(("  other IP", _n(k.other_bytes), f"{_n(k.other_packets)} packets"))
        if k.served_packets:
            rows.append(("  served (uncounted)", _n(k.served_bytes),
                         f"{_n(k.served_packets)} packets: replies on connections opened into"
                         " the namespace"))  # fmt: skip
        rows.append(
            (
                "  quota",
                _n(k.quota_used_bytes),
                f"used of {_n(k.quota_bytes)}; dropped {_n(k.dropped_bytes)} bytes"
                f" in {_n(k.dropped_packets)} packets",
            )
        )
    return rows


def checks(r: Readings, slack_bytes: int = 0) -> list[Check]:
    """The relations between the meters that were read (module doc)."""
    if slack_bytes < 0:
        raise ConfigError("slack must be >= 0 bytes")
    out = []
    wire = r.ledger.wire_bytes if r.ledger is not None else None
    payload = r.kernel.tcp_payload_bytes if r.kernel is not None else None
    if wire is not None and r.received is not None:
        gap = wire - r.received
        out.append(
            Check(
                "received <= charged",
                gap >= 0,
                f"the outer read {_n(r.received)} bytes, the ledger charged {_n(wire)}"
                + (f" ({_n(gap)} charged, not received)" if gap >= 0 else f" ({_n(-gap)} over)"),
            )
        )
    if wire is not None and payload is not None:
        out.append(
            Check(
                "kernel payload <= charged",
                payload <= wire + slack_bytes,
                f"{_n(payload)} payload bytes left the namespace, {_n(wire)} were charged"
                + (f" (slack {_n(slack_bytes)})" if slack_bytes else ""),
            )
        )
    if r.received is not None and payload is not None:
        out.append(
            Check(
                "received <= kernel payload",
                r.received <= payload + slack_bytes,
                f"the outer read {_n(r.received)} bytes; {_n(payload)} passed the kernel meter",
            )
        )
    if r.ledger is not None:
        s = r.ledger
        out.append(
            Check(
                "charged <= lifetime budget",
                s.usage.lifetime_bytes <= s.budgets.lifetime_bytes,
                f"{_n(s.usage.lifetime_bytes)} of {_n(s.budgets.lifetime_bytes)}",
            )
        )
    if r.kernel is not None:
        out.append(
            Check(
                "kernel dropped nothing",
                r.kernel.dropped_packets == 0,
                f"{_n(r.kernel.dropped_packets)} packets dropped at the quota",
            )
        )
        out.append(
            Check(
                "kernel refused nothing",
                r.kernel.refused_packets == 0,
                f"{_n(r.kernel.refused_packets)} packets to anything but the link refused",
            )
        )
    return out


def as_json(r: Readings, found: list[Check]) -> dict:
    """Everything `uplimit meters --json` prints."""
    return {
        "ledger": None
        if r.ledger is None
        else {
            "budget": r.ledger.name,
            "wire_bytes": r.ledger.wire_bytes,
            "timing_bytes": r.ledger.timing_bytes,
            "lifetime_bytes": r.ledger.usage.lifetime_bytes,
            "lifetime_budget": r.ledger.budgets.lifetime_bytes,
            "exhausted_by": r.ledger.exhausted_by.value if r.ledger.exhausted_by else None,
        },
        "received_bytes": r.received,
        "kernel": None if r.kernel is None else asdict(r.kernel),
        "checks": [asdict(c) for c in found],
        "agree": all(c.ok for c in found),
    }
