"""The handshake's ledger step over the real link (TCP on loopback, the real `InnerLink` and
`OuterLink`, a real SQLite ledger and receive counter): the outer refuses a link whose ledger
has charged less than the outer has received (a reset, swapped or rolled-back ledger), alarms
on a new ledger id, and shows what the inner says about its confinement."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from uplimit.coding.calibration import Calibration
from uplimit.errors import LinkError
from uplimit.link.auth import SECRET_BYTES
from uplimit.link.budget import Budgets
from uplimit.link.inner_link import InnerLink, serve_frames
from uplimit.link.ledger import SqliteLedger, init_ledger
from uplimit.link.meter import ReceiveCounter
from uplimit.link.metrics import OuterMetrics
from uplimit.link.outer_link import OuterLink
from uplimit.wire.fingerprint import codec_fingerprint
from uplimit.wire.frame import FrameConfig, FrameDecoder, max_frame_bytes
from uplimit.wire.receiver import AlarmKind, LinkState

HOST = "127.0.0.1"
BUDGET = Budgets(100_000)


class Idle:
    """A frame source with nothing to say: the handshake is all these tests need."""

    def open_stream(self, spec, extra) -> None: ...

    def cancel(self, stream_id) -> None: ...

    def next_frame(self) -> None:
        return None

    def resend(self, first) -> list[bytes]:
        return []


@dataclass
class Outcome:
    state: LinkState
    reason: str
    alarms: list[str]
    metrics: str


def link_once(weak, tmp_path: Path, ledger_path: Path, *, confined: bool = False) -> Outcome:
    """One outer start (its receive counter persists in tmp_path) and one inner connecting
    with `ledger_path`; the outer shuts the link down if it serves."""
    config = FrameConfig(4, weak.info.n_vocab)
    fingerprint = codec_fingerprint(weak.info, Calibration(), config)
    secret = secrets.token_bytes(SECRET_BYTES)

    async def main() -> Outcome:
        counter = ReceiveCounter(tmp_path / "received.db")
        metrics = OuterMetrics()
        ledger = SqliteLedger(ledger_path)
        try:
            with weak.session(8, 256) as session:
                decoder = FrameDecoder(session, weak.info.eos_ids, Calibration(), config)
                outer = OuterLink(
                    fingerprint, decoder, counter, metrics=metrics, budget_bytes=1 << 20,
                    max_frame_bytes=max_frame_bytes(config, 8), secret=secret,
                    allowed=frozenset({HOST}),
                )  # fmt: skip
                await outer.start(HOST)
                inner = await InnerLink.connect(
                    HOST, outer.downlink_port, outer.uplink_port, ledger, fingerprint,
                    secret=secret, log_path=tmp_path / "downlink.jsonl", tick_s=0.005,
                    confined=confined,
                )  # fmt: skip
                serving = asyncio.create_task(serve_frames(inner, Idle()))
                with contextlib.suppress(LinkError):
                    await outer.wait_serving(30)
                await outer.shutdown(timeout_s=10)
                with contextlib.suppress(LinkError):
                    await asyncio.wait_for(serving, 10)
                await inner.aclose()
                kinds = [a.kind for a in outer.alarms]
                return Outcome(outer.state, outer.reason, kinds, metrics.exposition().decode())
        finally:
            ledger.close()
            counter.close()

    return asyncio.run(main())


def test_an_honest_ledger_serves_and_the_confinement_claim_is_shown(tiny_weak, tmp_path):
    ledger = tmp_path / "ledger.db"
    init_ledger(ledger, BUDGET)
    first = link_once(tiny_weak, tmp_path, ledger)
    assert (first.state, first.alarms) == (LinkState.CLOSED, [])
    assert "uplimit_inner_confined 0.0" in first.metrics
    again = link_once(tiny_weak, tmp_path, ledger, confined=True)  # the same ledger, more used
    assert (again.state, again.alarms) == (LinkState.CLOSED, [])
    assert "uplimit_inner_confined 1.0" in again.metrics


def test_a_reset_ledger_is_refused_at_the_handshake(tiny_weak, tmp_path):
    ledger = tmp_path / "ledger.db"
    init_ledger(ledger, BUDGET)
    assert link_once(tiny_weak, tmp_path, ledger).state is LinkState.CLOSED
    # Someone deletes the ledger (and its WAL) and initialises a fresh one: usage back to 0.
    for path in tmp_path.glob("ledger.db*"):
        path.unlink()
    init_ledger(ledger, BUDGET)
    reset = link_once(tiny_weak, tmp_path, ledger)
    assert reset.state is LinkState.FAILED and reset.alarms == [AlarmKind.LEDGER]
    assert "a reset or swapped ledger" in reset.reason
    assert 'uplimit_alarms_total{kind="ledger"} 1.0' in reset.metrics


def test_a_rolled_back_ledger_is_refused_and_a_new_id_alarms(tiny_weak, tmp_path):
    ledger, backup = tmp_path / "ledger.db", tmp_path / "backup.db"
    init_ledger(ledger, BUDGET)
    with contextlib.closing(SqliteLedger(ledger)) as book:
        book.charge(100, note="a frame lost in a crash: charged, never received")
    shutil.copyfile(ledger, backup)  # WAL mode: the copy is taken with no open connection
    assert link_once(tiny_weak, tmp_path, ledger).state is LinkState.CLOSED
    # The same id with a lower total than the outer saw last time, though still above what
    # the outer received: a restored copy.
    shutil.copyfile(backup, ledger)
    rolled = link_once(tiny_weak, tmp_path, ledger)
    assert rolled.state is LinkState.FAILED and "went back" in rolled.reason
    # A new ledger whose total covers all the outer received serves, with an alarm.
    other = tmp_path / "other.db"
    init_ledger(other, BUDGET)
    with contextlib.closing(SqliteLedger(other)) as book:
        book.charge(10_000, note="more than the outer ever received")
    swapped = link_once(tiny_weak, tmp_path, other)
    assert swapped.state is LinkState.CLOSED and swapped.alarms == [AlarmKind.LEDGER]
