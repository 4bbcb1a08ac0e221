"""Budget windows and clock steps on the real link: both ends in this process over loopback
TCP, the real ledger, frames coded with the tiny weak model (empty frames: no streams, so the
per-second budget is what decides when they go).

The clocks are injected (the ledger's and the inner link's, the same one), as a stepped
system clock would show them across a restart or on a PostgreSQL server."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from uplimit.coding.calibration import Calibration
from uplimit.link.auth import SECRET_BYTES
from uplimit.link.budget import SECONDS_PER_DAY, Budgets, steady_time
from uplimit.link.inner_link import InnerLink, serve_frames
from uplimit.link.ledger import SqliteLedger
from uplimit.link.meter import ReceiveCounter
from uplimit.link.outer_link import OuterLink
from uplimit.wire.fingerprint import codec_fingerprint
from uplimit.wire.frame import (
    FrameConfig,
    FrameContent,
    FrameDecoder,
    FrameEncoder,
    max_frame_bytes,
)
from uplimit.wire.protocol import EndReason
from uplimit.wire.receiver import LinkState

HOST = "127.0.0.1"
TICK = 0.02
PER_SECOND = 120  # the handshake (8 + 64 + 5 bytes and timing), then a few empty frames


class EmptyFrames:
    """A frame source with no streams: one empty coded frame per tick."""

    def __init__(self, encoder: FrameEncoder) -> None:
        self.encoder = encoder

    def open_stream(self, spec, extra) -> None:
        raise AssertionError("no streams in this test")

    def cancel(self, stream_id: int) -> None:
        pass

    def next_frame(self) -> bytes:
        return self.encoder.encode(FrameContent())[0]

    def resend(self, first: int) -> list[bytes]:
        return self.encoder.resend(first)


@dataclass
class Pair:
    outer: OuterLink
    inner: InnerLink
    ledger: SqliteLedger
    serving: asyncio.Task[EndReason] | None = None


@contextlib.asynccontextmanager
async def linked(
    weak, tmp_path: Path, clock: Callable[[], float], **inner_options
) -> AsyncIterator[Pair]:
    config = FrameConfig(4, weak.info.n_vocab)
    fingerprint = codec_fingerprint(weak.info, Calibration(), config)
    with contextlib.ExitStack() as stack:
        outer_session = stack.enter_context(weak.session(4, 64))
        inner_session = stack.enter_context(weak.session(4, 64))
        decoder = FrameDecoder(outer_session, weak.info.eos_ids, Calibration(), config)
        counter = ReceiveCounter(tmp_path / "received.db")
        stack.callback(counter.close)
        ledger = SqliteLedger(
            tmp_path / "ledger.db", Budgets(1 << 20, None, PER_SECOND), clock=clock
        )
        stack.callback(ledger.close)
        secret = secrets.token_bytes(SECRET_BYTES)
        outer = OuterLink(
            fingerprint, decoder, counter, budget_bytes=1 << 20,
            max_frame_bytes=max_frame_bytes(config, 4), secret=secret, allowed=frozenset({HOST}),
        )  # fmt: skip
        await outer.start(HOST)
        try:
            inner = await InnerLink.connect(
                HOST, outer.downlink_port, outer.uplink_port, ledger, fingerprint, secret=secret,
                log_path=tmp_path / "downlink.jsonl", tick_s=TICK, clock=clock, **inner_options,
            )  # fmt: skip
            await outer.wait_serving()
            encoder = FrameEncoder(inner_session, weak.info.eos_ids, Calibration(), config)
            pair = Pair(outer, inner, ledger)
            pair.serving = asyncio.create_task(serve_frames(inner, EmptyFrames(encoder)))
            yield pair
            if not pair.serving.done():
                await outer.shutdown()
            await asyncio.wait_for(pair.serving, 10)
        finally:
            await outer.aclose()


def test_a_step_forward_and_back_does_not_stall_the_link(tiny_weak, tmp_path):
    """The clock jumps a day and an hour ahead for a second, then back: frames keep going, and
    no second ever carries more than its budget (with windows stranded ahead, every frame
    would wait for a second that does not come, and the link would end stalled)."""
    offset = 0.0

    def clock() -> float:
        return steady_time() + offset

    async def main() -> None:
        nonlocal offset
        async with linked(tiny_weak, tmp_path, clock, stall_limit_s=2.0) as pair:
            await asyncio.sleep(1.0)
            offset = SECONDS_PER_DAY + 3600.0
            await asyncio.sleep(1.0)
            offset = 0.0
            back = pair.outer.delivered_frames
            await asyncio.sleep(3.0)
            assert pair.outer.state is LinkState.SERVING, pair.outer.reason
            assert pair.outer.delivered_frames >= back + 6  # ~20 a second go on
            assert [a.kind for a in pair.inner.alarms] == ["clock"]  # the step back, once
            per_second: dict[int, int] = {}
            for c in pair.ledger.charge_log():
                per_second[int(c.at // 1)] = (
                    per_second.get(int(c.at // 1), 0) + c.n_bytes + c.timing_bytes
                )
            assert max(per_second.values()) <= PER_SECOND

    asyncio.run(main())


def test_a_window_that_never_rolls_over_ends_the_link_with_an_alarm(tiny_weak, tmp_path):
    """A stopped clock: the per-second window never rolls over. After the stall limit the
    inner raises an alarm and sends END, and the outer sees the link exhausted, not silent."""

    def stopped() -> float:
        return 1_800_000_000.5

    async def main() -> None:
        started = time.monotonic()
        async with linked(tiny_weak, tmp_path, stopped, stall_limit_s=1.0) as pair:
            assert await pair.outer.wait_final(10) is LinkState.EXHAUSTED
            waited = time.monotonic() - started
            assert pair.serving is not None
            assert await asyncio.wait_for(pair.serving, 10) is EndReason.PER_SECOND
            assert pair.ledger.usage().usage.second_bytes <= PER_SECOND
        assert pair.outer.reason == "upload budget exhausted (per-second)"
        assert [a.kind for a in pair.inner.alarms] == ["stalled"]
        assert 1.0 <= waited < 5.0

    asyncio.run(main())
