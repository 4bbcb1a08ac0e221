"""The red team's attacks with a relay between the attacked inner and the outer (docs/tiers.md).

`RelayedLive` is a `Live` whose inner is a relay: each run's attacker connects to the relay's
inbound link (an outer of its own: its receive counter, decoder, request table and the inner
link's secret), and the relay forwards the outer's workload with `relay.serve.forward_link`,
charging the run's ledger. The attacks run unchanged, so what they report is what reached the
outer. What reached the relay is recorded beside it (`RelayView`): when the relay decoded each
of the attacker's frames, the bytes the relay read, its link's state and alarms; the outer's
frame arrivals too, for the timing channel's figures on both links.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from uplimit.errors import LinkError
from uplimit.link.alarms import Alarm
from uplimit.link.auth import create_secret, load_secret
from uplimit.link.budget import Budgets
from uplimit.link.inner_link import InnerLink
from uplimit.link.ledger import SqliteLedger
from uplimit.link.meter import ReceiveCounter, unproved
from uplimit.link.outer_link import FrameHook, OuterLink
from uplimit.outer.link import TransportUplink
from uplimit.outer.service import OuterService
from uplimit.redteam.live import InnerEnv, InnerRunner, Live, Outcome, Pair, Tap
from uplimit.relay.serve import forward_link
from uplimit.wire.frame import FrameConfig, FrameContent, FrameDecoder, FrameStats, max_frame_bytes
from uplimit.wire.receiver import LinkState

__all__ = ["RelayView", "RelayedLive"]

_SETTLE_S = 15.0  # how long the attacker may take to stop once its link is shut down


@dataclass
class RelayView:
    """What one relayed run showed at the relay, and the outer's frame arrivals."""

    relay_arrivals: list[float] = field(default_factory=list)  # the attacker's frames, decoded
    outer_arrivals: list[float] = field(default_factory=list)  # the relay's frames, decoded
    received_bytes: int = 0  # what the relay process read from the attacker
    state: LinkState = LinkState.HANDSHAKING  # of the attacker's link, at the end
    alarms: list[Alarm] = field(default_factory=list)  # of the attacker's link
    outcome: Outcome | None = None  # the run's, at the outer (what the attack reports from)


class _OuterArrivals(Tap):
    """The attack's own tap, plus the outer's frame arrivals for the view."""

    def __init__(self, tap: Tap, view: RelayView) -> None:
        self.tap, self.view = tap, view

    def token(self, *args: Any) -> None:
        self.tap.token(*args)

    def frame(self, content: FrameContent, stats: FrameStats, at: float) -> None:
        self.view.outer_arrivals.append(at)
        self.tap.frame(content, stats, at)


class RelayedLive(Live):
    """A `Live` with the relay in the inner's place (module doc); `release`: `[relay]
    release`. `views` has one `RelayView` per run, in order."""

    def __init__(self, pair: Pair, settings: Any, workdir: str | Path, *, release: str) -> None:
        super().__init__(pair, settings, workdir)
        self.release = release
        self.views: list[RelayView] = []
        self.inner_secret = self.workdir / "inner-link.secret"  # the attacker's link's
        if not self.inner_secret.exists():
            create_secret(self.inner_secret)

    async def run(  # type: ignore[override]
        self, name: str, inner: InnerRunner, prompts: Any, temperature: float, **kwargs: Any
    ) -> Outcome:
        view = RelayView()
        self.views.append(view)
        kwargs["tap"] = _OuterArrivals(kwargs.get("tap") or Tap(), view)
        relay = functools.partial(self._relay, inner, view)
        view.outcome = await super().run(name, relay, prompts, temperature, **kwargs)
        return view.outcome

    async def _relay(self, attacker: InnerRunner, view: RelayView, env: InnerEnv) -> object:
        p, s = self.pair, self.settings
        tag = env.log_path.stem.removesuffix("-downlink")
        frame_config = FrameConfig(s.frame_tokens, p.weak.info.n_vocab)
        session = p.weak.session(s.max_streams, s.max_context + 1)
        decoder = FrameDecoder(session, p.weak.info.eos_ids, p.calibration, frame_config)
        counter = ReceiveCounter(self.workdir / f"{tag}-relay-received.db")
        before_proof = unproved(counter)
        ledger = SqliteLedger(self.workdir / f"{tag}-inner-ledger.db", Budgets(s.budget_bytes))

        def build(hook: FrameHook) -> OuterLink:
            def on_frame(content: FrameContent, stats: FrameStats) -> None:
                view.relay_arrivals.append(time.time())
                hook(content, stats)

            return OuterLink(
                env.fingerprint, decoder, counter, on_frame=on_frame, budget_bytes=s.budget_bytes,
                max_frame_bytes=max_frame_bytes(frame_config, s.max_streams),
                secret=load_secret(self.inner_secret), allowed=frozenset({env.host}),
            )  # fmt: skip

        uplink = TransportUplink(build, decoder)
        service = OuterService(p.weak, uplink, max_context=s.max_context)
        attack: asyncio.Task[object] | None = None
        try:
            await uplink.link.start(env.host)
            attacker_env = replace(
                env, ledger=ledger, downlink_port=uplink.link.downlink_port,
                uplink_port=uplink.link.uplink_port, secret_path=self.inner_secret,
                log_path=self.workdir / f"{tag}-inner-downlink.jsonl",
            )  # fmt: skip
            attack = asyncio.create_task(attacker(attacker_env))
            service.start()
            with contextlib.suppress(LinkError, TimeoutError):
                await uplink.link.wait_serving(timeout_s=min(60.0, s.timeout_s))

            async def connect(fingerprint: dict[str, str]) -> InnerLink:
                return await env.connect(fingerprint)

            return await forward_link(
                service, p.weak, p.calibration, frame_config, connect,
                max_streams=s.max_streams, max_context=s.max_context, release=self.release,
            )  # fmt: skip
        finally:
            with contextlib.suppress(Exception):
                await uplink.link.shutdown(timeout_s=10.0)
            if attack is not None:
                await asyncio.wait([attack], timeout=_SETTLE_S)
                attack.cancel()
                await asyncio.gather(attack, return_exceptions=True)
            await service.aclose()
            await uplink.link.aclose()
            session.close()
            view.received_bytes = counter.total() + before_proof.total()
            view.state, view.alarms = uplink.link.state, list(uplink.link.alarms)
            counter.close()
            before_proof.close()
            ledger.close()
