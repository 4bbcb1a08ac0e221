"""Both sides together: the one module that composes the inner and the outer.

Neither side imports the other (they share only `wire`); what runs both at once lives here.

- `serve_both`: `uplimit serve both`, the outer in this process and the inner confined in
  its namespace (`inner.confine`; or in this process too with `--unconfined`), joined by the
  real (metered) link.
- `in_process`: an outer's `Uplink` to an `InnerService` in the same process over the real
  link, its two ends joined in memory (`link.memory`), so that the service tests exercise the
  production serving loop.

The demo (`uplimit.demo`) runs the two sides as separate processes instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uplimit.coding.calibration import Calibration
from uplimit.config import Config, link_secret_path
from uplimit.inner.service import InnerService
from uplimit.link.auth import SECRET_BYTES, create_secret
from uplimit.link.budget import DEFAULT_TICK_S
from uplimit.link.inner_link import InnerLink, serve_frames
from uplimit.link.ledger import Ledger
from uplimit.link.memory import HOST, MemoryNetwork
from uplimit.link.meter import ReceiveCounter
from uplimit.link.outer_link import FrameHook, OuterLink
from uplimit.models.base import LanguageModel, ModelInfo
from uplimit.outer.link import TransportUplink
from uplimit.outer.serve import serve_outer
from uplimit.wire.fingerprint import codec_fingerprint
from uplimit.wire.frame import FrameContent, FrameDecoder, FrameStats, max_frame_bytes
from uplimit.wire.protocol import EndReason

__all__ = ["InProcess", "in_process", "serve_both"]

log = logging.getLogger(__name__)


async def serve_both(
    run_inner: Coroutine[Any, Any, object],
    outer_config: Config,
    outer_weak: LanguageModel,
    *,
    on_listening: Callable[[], None] | None = None,
) -> None:
    """Run the inner (`inner.confine.run_confined`, or `serve_inner` in this process when
    unconfined) and the outer until the outer stops; each side has its own weak model (and
    config: a rollout record is per side). One process holds both sides, so it creates the
    link's secret file if there is none (0600; the two configs name the same file)."""
    secret = link_secret_path(outer_config)
    if not secret.exists():
        log.info("both: creating the link secret %s", create_secret(secret))
    inner = asyncio.create_task(run_inner)
    try:
        await serve_outer(outer_config, outer_weak, on_listening=on_listening)
    finally:
        await asyncio.wait_for(inner, timeout=30)


@dataclass
class InProcess:
    """An outer's uplink and the inner behind it, joined in memory (`in_process`)."""

    uplink: TransportUplink
    frames: list[FrameStats] = field(default_factory=list)  # delivered to the outer, in order


@contextlib.asynccontextmanager
async def in_process(
    inner: InnerService,
    decoder: FrameDecoder,
    weak: ModelInfo,
    calibration: Calibration,
    ledger: Ledger,
    workdir: Path,
    *,
    tick_s: float = DEFAULT_TICK_S,
) -> AsyncIterator[InProcess]:
    """The real link between `inner` and an outer decoding with `decoder`, in one process.

    Both ends are the production ones over `link.memory` instead of TCP: the handshake (the
    challenge over a secret made here; each side's codec fingerprint from its own frame
    configuration), the inner's `serve_frames`
    (charged before sending, END reserve, timing charge, resends), the outer's receiver and
    receive counter and receive budget (the ledger's lifetime figure). `inner` is started here
    and closed on the way out, after SHUTDOWN."""
    network = MemoryNetwork()
    counter = ReceiveCounter(workdir / "received.db")
    budget = ledger.usage().budgets.lifetime_bytes  # the outer's own, the same figure
    secret = secrets.token_bytes(SECRET_BYTES)  # the link's, for the two ends in this process
    pair: InProcess | None = None

    def build(hook: FrameHook) -> OuterLink:
        def deliver(content: FrameContent, stats: FrameStats) -> None:
            assert pair is not None
            pair.frames.append(stats)
            hook(content, stats)

        fingerprint = codec_fingerprint(weak, calibration, decoder.config)
        return OuterLink(
            fingerprint, decoder, counter, on_frame=deliver, budget_bytes=budget,
            max_frame_bytes=max_frame_bytes(decoder.config, inner.config.max_streams),
            secret=secret, allowed=frozenset({HOST}),
        )  # fmt: skip

    pair = InProcess(TransportUplink(build, decoder))
    outer = pair.uplink.link
    serving: asyncio.Task[EndReason] | None = None
    try:
        await outer.start(HOST, start_server=network.start_server)
        link = await InnerLink.connect(
            HOST, outer.downlink_port, outer.uplink_port, ledger,
            codec_fingerprint(weak, calibration, inner.frame_config), secret=secret,
            log_path=workdir / "downlink.jsonl", tick_s=tick_s,
            open_connection=network.open_connection,
        )  # fmt: skip
        await outer.wait_serving()
        inner.start()
        serving = asyncio.create_task(serve_frames(link, inner))
        yield pair
    finally:
        await outer.shutdown()
        if serving is not None:
            with contextlib.suppress(Exception):  # it ended the link; the outer has the reason
                await serving
        await asyncio.to_thread(inner.close)
        counter.close()
