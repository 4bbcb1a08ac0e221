"""Budget windows and clock steps on the real link: loopback TCP, the real ledger, frames coded
with the tiny weak model (empty frames: no streams, so the per-second budget is what decides
when they go).

Both ends in this process with an injected clock (the ledger's and the inner link's, the same
one), as a stepped system clock would show them across a restart or on a PostgreSQL server;
and an inner process whose system clock really steps (libfaketime), which its default clock
(`budget.steady_time`) ignores."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
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
from uplimit.redteam.attacks import EmptyFrames
from uplimit.wire.fingerprint import codec_fingerprint
from uplimit.wire.frame import (
    FrameConfig,
    FrameDecoder,
    FrameEncoder,
    max_frame_bytes,
)
from uplimit.wire.protocol import EndReason
from uplimit.wire.receiver import LinkState

HOST = "127.0.0.1"
TICK = 0.02
PER_SECOND = 120  # the handshake (8 + 64 + 5 bytes and timing), then a few empty frames


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


FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

# An inner process on the tiny weak model: empty frames through its own ledger (default clock)
# until SHUTDOWN; prints its END reason and its alarms.
_INNER = r"""
import asyncio, json, sys
cfg = json.loads(sys.argv[1])
from uplimit.coding.calibration import Calibration
from uplimit.link.budget import Budgets
from uplimit.link.inner_link import InnerLink, serve_frames
from uplimit.link.ledger import SqliteLedger
from uplimit.models.hf import HFModel
from uplimit.redteam.attacks import EmptyFrames
from uplimit.wire.frame import FrameConfig, FrameEncoder

async def main():
    weak = HFModel(cfg["weak"])
    ledger = SqliteLedger(cfg["ledger"], Budgets(1 << 20, None, cfg["per_second"]))
    link = await InnerLink.connect(
        "127.0.0.1", cfg["down"], cfg["up"], ledger, cfg["fingerprint"],
        secret=bytes.fromhex(cfg["secret"]), log_path=cfg["log"], tick_s=cfg["tick_s"],
    )
    with weak.session(1, 8) as session:
        config = FrameConfig(4, weak.info.n_vocab)
        source = EmptyFrames(FrameEncoder(session, weak.info.eos_ids, Calibration(), config))
        reason = await serve_frames(link, source)
    print(json.dumps({"end": reason.name, "alarms": [a.kind for a in link.alarms]}), flush=True)

asyncio.run(main())
"""


def test_an_inner_process_whose_system_clock_steps_keeps_its_windows(
    tiny_weak, tiny_pair_dirs, tmp_path, missing
):
    """The inner's system clock (CLOCK_REALTIME, through libfaketime) jumps a day ahead and
    back while it serves: its windows' clock ignores both steps, so the link never stalls, no
    alarm is raised, the ledger's times run on without a jump, and no second passes its
    budget."""
    if not FAKETIME.exists():
        missing("faketime", f"needs libfaketime ({FAKETIME}; apt-get install faketime)")
    stamp = tmp_path / "faketime"
    stamp.write_text("+0\n")
    env = {
        **os.environ, "LD_PRELOAD": str(FAKETIME), "FAKETIME_TIMESTAMP_FILE": str(stamp),
        "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }  # fmt: skip
    config = FrameConfig(4, tiny_weak.info.n_vocab)
    fingerprint = codec_fingerprint(tiny_weak.info, Calibration(), config)
    secret = secrets.token_bytes(SECRET_BYTES)

    async def main() -> tuple[dict, int]:
        with tiny_weak.session(4, 64) as session:
            decoder = FrameDecoder(session, tiny_weak.info.eos_ids, Calibration(), config)
            counter = ReceiveCounter(tmp_path / "received.db")
            outer = OuterLink(
                fingerprint, decoder, counter, budget_bytes=1 << 20,
                max_frame_bytes=max_frame_bytes(config, 4), secret=secret,
                allowed=frozenset({HOST}),
            )  # fmt: skip
            await outer.start(HOST)
            cfg = {
                "weak": str(tiny_pair_dirs[1]), "ledger": str(tmp_path / "ledger.db"),
                "per_second": PER_SECOND, "down": outer.downlink_port, "up": outer.uplink_port,
                "fingerprint": fingerprint, "secret": secret.hex(),
                "log": str(tmp_path / "downlink.jsonl"), "tick_s": TICK,
            }  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _INNER, json.dumps(cfg), env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                await outer.wait_serving(240)
                await asyncio.sleep(1.0)
                stamp.write_text("+1d\n")
                await asyncio.sleep(1.5)
                stamp.write_text("+0\n")
                back = outer.delivered_frames
                await asyncio.sleep(3.0)
                assert outer.state is LinkState.SERVING, outer.reason
                after = outer.delivered_frames - back
                assert await outer.shutdown() is LinkState.CLOSED
                out, err = await asyncio.wait_for(proc.communicate(), 60)
            finally:
                if proc.returncode is None:
                    proc.kill()
                await outer.aclose()
                counter.close()
        assert out, err.decode()[-2000:]
        return json.loads(out.decode().splitlines()[-1]), after

    result, after = asyncio.run(main())
    assert result == {"end": "SHUTDOWN", "alarms": []}
    assert after >= 20  # frames went on after the step back
    ledger = SqliteLedger(tmp_path / "ledger.db")
    try:
        times = [c.at for c in ledger.charge_log()]
        per_second: dict[int, int] = {}
        for c in ledger.charge_log():
            per_second[int(c.at)] = per_second.get(int(c.at), 0) + c.n_bytes + c.timing_bytes
    finally:
        ledger.close()
    assert times == sorted(times) and times[-1] - times[0] < 60  # no day in between
    assert max(per_second.values()) <= PER_SECOND
