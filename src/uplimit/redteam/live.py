"""A live system on loopback for one red-team run: the real outer, an inner that may lie.

The outer side is what `uplimit serve outer` runs (OuterLink + OuterService + frame decoder),
with the bits/token monitor wired in, listening on loopback (or on a kernel meter's address).
The inner side is a coroutine the attack supplies (`InnerRunner`); `InnerEnv` gives it what an
inner host has: the models, a fresh ledger with the run's budget, the link's address, and the
honest building blocks (`connect`, `service`), which an attack may use, wrap or skip.

One `run` sends a workload (prompts at one temperature) through the outer's request table,
waits until every stream ended or the link stopped, shuts the link down, and returns an
`Outcome`: what every meter and detector saw. Taps (`Tap`) let an attack's accomplice watch
the outer's decoded tokens and frames, as a party outside with the weak model could.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from uplimit.coding.calibration import Calibration
from uplimit.coding.codec import Prediction
from uplimit.coding.sampling import SamplingParams
from uplimit.errors import LinkError, UplimitError
from uplimit.inner.scheduler import Scheduler, SchedulerConfig
from uplimit.inner.service import InnerService
from uplimit.inner.spotcheck import SpotChecker, Verdict
from uplimit.link.alarms import Alarm
from uplimit.link.auth import create_secret, load_secret
from uplimit.link.budget import Budgets, steady_time
from uplimit.link.inner_link import InnerLink
from uplimit.link.ledger import Ledger, SqliteLedger
from uplimit.link.meter import ReceiveCounter, unproved
from uplimit.link.outer_link import FrameHook, OuterLink
from uplimit.models.base import LanguageModel, Logits
from uplimit.outer.link import TransportUplink
from uplimit.outer.monitor import BitsMonitor, MonitorAlarm, MonitorThresholds
from uplimit.outer.service import Finished, OuterService
from uplimit.wire.checks import CheckJob
from uplimit.wire.fingerprint import codec_fingerprint
from uplimit.wire.frame import (
    FrameConfig,
    FrameContent,
    FrameDecoder,
    FrameStats,
    max_frame_bytes,
)
from uplimit.wire.receiver import LinkState
from uplimit.wire.streams import StreamSpec, StreamState

__all__ = ["InnerEnv", "InnerRunner", "Live", "LiveSettings", "Outcome", "Pair", "Tap"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    strong: LanguageModel
    weak: LanguageModel
    calibration: Calibration
    strong_ref: str  # how the spot-checker process loads its own copy
    backend: str | None = None
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LiveSettings:
    frame_tokens: int = 4
    max_streams: int = 8
    max_batch: int = 4
    max_context: int = 512
    max_tokens: int = 32
    tick_s: float = 0.02
    budget_bytes: int = 32_768
    timeout_s: float = 120.0  # a run's workload, at most
    check_wait_s: float = 600.0  # for the spot-checker's verdicts (it may still be loading)
    host: str = "127.0.0.1"

    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_batch=self.max_batch,
            max_streams=self.max_streams,
            max_context=self.max_context,
            frame_tokens=self.frame_tokens,
        )


@dataclass
class InnerEnv:
    pair: Pair
    settings: LiveSettings
    ledger: SqliteLedger
    host: str
    downlink_port: int
    uplink_port: int
    fingerprint: dict[str, str]
    log_path: Path
    secret_path: Path  # the link's secret: a compromised inner host holds it

    async def connect(
        self,
        fingerprint: dict[str, str] | None = None,
        *,
        ledger: Ledger | None = None,
        clock: Callable[[], float] = steady_time,
    ) -> InnerLink:
        """The honest inner's link; `ledger` and `clock`: the attacker's own, if it likes."""
        return await InnerLink.connect(
            self.host,
            self.downlink_port,
            self.uplink_port,
            ledger or self.ledger,
            fingerprint or self.fingerprint,
            secret=load_secret(self.secret_path),
            log_path=self.log_path,
            tick_s=self.settings.tick_s,
            n_vocab=self.pair.weak.info.n_vocab,
            clock=clock,
        )

    def service(self, scheduler: Callable[..., Scheduler] = Scheduler) -> InnerService:
        p = self.pair
        cfg = self.settings.scheduler()
        return InnerService(p.strong, p.weak, p.calibration, cfg, scheduler=scheduler)


InnerRunner = Callable[[InnerEnv], Awaitable[object]]


class Tap:
    """An accomplice's view of the outer side; override what it needs."""

    def token(self, spec: StreamSpec, position: int, weak_logits: Logits, token: int) -> None:
        pass

    def frame(self, content: FrameContent, stats: FrameStats, at: float) -> None:
        pass


@dataclass
class Outcome:
    started: float
    ended: float
    state: LinkState
    reason: str
    link_alarms: list[Alarm]
    monitor_alarms: list[MonitorAlarm]
    verdicts: list[Verdict]
    received_bytes: int  # the outer's receive counts in this run, before and after proofs
    charged_wire_bytes: int  # the inner's ledger
    charged_timing_bytes: int
    streams: dict[int, tuple[StreamSpec, list[int]]]  # what the outer decoded
    finished: list[Finished]
    inner_error: str = ""
    timed_out: bool = False  # the workload did not end within `timeout_s`
    traces: list[tuple[bool, list[float]]] = field(default_factory=list)  # monitor's

    @property
    def charged_bytes(self) -> int:
        return self.charged_wire_bytes + self.charged_timing_bytes

    @property
    def tokens(self) -> int:
        return sum(len(t) for _, t in self.streams.values())


class Live:
    """Runs one workload against one inner (module doc); a fresh link and ledger per run."""

    def __init__(
        self,
        pair: Pair,
        settings: LiveSettings,
        workdir: str | Path,
        *,
        thresholds: MonitorThresholds | None = None,
        checker: SpotChecker | None = None,
    ) -> None:
        self.pair = pair
        self.settings = settings
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.thresholds = thresholds
        self.checker = checker
        self._runs = 0
        self.secret_path = self.workdir / "link.secret"
        if not self.secret_path.exists():
            create_secret(self.secret_path)

    async def run(
        self,
        name: str,
        inner: InnerRunner,
        prompts: Sequence[Sequence[int]],
        temperature: float,
        *,
        tap: Tap | None = None,
        seed: int = 0,
        host: str | None = None,
        inner_address: str | None = None,
        ports: tuple[int, int] = (0, 0),
        counter: Path | None = None,
        ledger_path: Path | None = None,
    ) -> Outcome:
        """`counter`: the outer's receive-counter file, to keep across runs (an outer that
        restarts); `ledger_path`: an initialised ledger to charge (default: a fresh one with
        the run's budget). Without them each run has its own. `host`: where the outer listens;
        `inner_address`: where the inner connects from (default: `host`, loopback)."""
        self._runs += 1
        tag = f"{self._runs:02d}-{name}"
        p, s = self.pair, self.settings
        host = host or s.host
        tap = tap or Tap()
        frame_config = FrameConfig(s.frame_tokens, p.weak.info.n_vocab)
        session = p.weak.session(s.max_streams, s.max_context + 1)
        decoder = FrameDecoder(session, p.weak.info.eos_ids, p.calibration, frame_config)
        fingerprint = codec_fingerprint(p.weak.info, p.calibration, frame_config)
        counter = ReceiveCounter(counter or self.workdir / f"{tag}-received.db")
        before_proof = unproved(counter)  # what uplinks sent before they proved themselves
        before = counter.total() + before_proof.total()
        ledger = (
            SqliteLedger(ledger_path)
            if ledger_path is not None
            else SqliteLedger(self.workdir / f"{tag}-ledger.db", Budgets(s.budget_bytes))
        )
        decoded: dict[int, list[int]] = {}

        def build(hook: FrameHook) -> OuterLink:
            def on_frame(content: FrameContent, stats: FrameStats) -> None:
                for sid, toks in content.tokens.items():
                    decoded.setdefault(sid, []).extend(toks)
                tap.frame(content, stats, time.time())
                hook(content, stats)

            return OuterLink(
                fingerprint, decoder, counter, on_frame=on_frame, budget_bytes=s.budget_bytes,
                max_frame_bytes=max_frame_bytes(frame_config, s.max_streams),
                secret=load_secret(self.secret_path), allowed=frozenset({inner_address or host}),
            )  # fmt: skip

        uplink = TransportUplink(build, decoder)
        monitor = BitsMonitor(self.thresholds, keep_traces=True)
        service = OuterService(p.weak, uplink, max_context=s.max_context, monitor=monitor)
        observe = decoder.observe

        def on_token(state: StreamState, logits: Logits, pred: Prediction, token: int) -> None:
            assert observe is not None
            observe(state, logits, pred, token)
            tap.token(state.spec, len(state.tokens), logits, token)

        decoder.observe = on_token
        started = time.time()
        inner_task: asyncio.Task[object] | None = None
        specs: dict[int, StreamSpec] = {}
        finished: list[Finished] = []
        offered: set[int] = set()
        checked_before = len(self.checker.verdicts()) if self.checker else 0
        try:
            await uplink.link.start(host, downlink_port=ports[0], uplink_port=ports[1])
            env = InnerEnv(
                p,
                s,
                ledger,
                host,
                uplink.link.downlink_port,
                uplink.link.uplink_port,
                fingerprint,
                self.workdir / f"{tag}-downlink.jsonl",
                self.secret_path,
            )
            inner_task = asyncio.create_task(inner(env))
            service.start()
            with contextlib.suppress(LinkError, TimeoutError):
                await uplink.link.wait_serving(timeout_s=min(60.0, s.timeout_s))
            params = SamplingParams(temperature=temperature)
            timed_out = False
            try:
                async with asyncio.timeout(s.timeout_s):
                    await self._workload(service, prompts, params, seed, specs, finished)
            except TimeoutError:
                timed_out = True
            for sid, spec in specs.items():
                if self.checker is not None and sid not in offered and decoded.get(sid):
                    offered.add(sid)
                    self.checker.offer(CheckJob(spec, tuple(decoded[sid])))
            with contextlib.suppress(Exception):
                await uplink.link.shutdown(timeout_s=10.0)
            inner_error = await _settle(inner_task)
        finally:
            if inner_task is not None and not inner_task.done():
                inner_task.cancel()
                await asyncio.gather(inner_task, return_exceptions=True)
            await service.aclose()
            await uplink.link.aclose()
            session.close()
        verdicts = self.checker.verdicts(wait_s=s.check_wait_s) if self.checker else []
        usage = ledger.usage()
        outcome = Outcome(
            started=started,
            ended=time.time(),
            state=uplink.link.state,
            reason=uplink.link.reason,
            link_alarms=list(uplink.link.alarms),
            monitor_alarms=list(monitor.alarms),
            verdicts=verdicts[checked_before:],
            received_bytes=counter.total() + before_proof.total() - before,
            charged_wire_bytes=usage.wire_bytes,
            charged_timing_bytes=usage.timing_bytes,
            streams={sid: (spec, decoded.get(sid, [])) for sid, spec in specs.items()},
            finished=finished,
            inner_error=inner_error,
            timed_out=timed_out,
            traces=monitor.traces(),
        )
        counter.close()
        before_proof.close()
        ledger.close()
        return outcome

    async def _workload(
        self,
        service: OuterService,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        seed: int,
        specs: dict[int, StreamSpec],
        finished: list[Finished],
    ) -> None:
        """Every prompt as one request, all at once; until each choice finished."""
        waits = []
        for i, prompt in enumerate(prompts):
            try:
                sub = await service.submit(
                    list(prompt),
                    params,
                    request_id=f"redteam-{i}",
                    max_tokens=self.settings.max_tokens,
                    seed=seed + i,
                )
            except UplimitError:
                break  # the link stopped serving: what was sent is the run
            for c in sub.choices:
                specs[c.stream_id] = StreamSpec(
                    c.stream_id, tuple(prompt), params, c.seed, c.max_tokens
                )
                waits.append(_until_finished(c.events, finished))
        await asyncio.gather(*waits)


async def _until_finished(events: asyncio.Queue, finished: list[Finished]) -> None:
    while not isinstance(event := await events.get(), Finished):
        pass
    finished.append(event)


async def _settle(task: asyncio.Task[object], timeout_s: float = 15.0) -> str:
    """Wait for the inner to end; what it raised, if anything, as text."""
    done, _ = await asyncio.wait([task], timeout=timeout_s)
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return "inner did not stop; cancelled"
    exc = task.exception()
    return "" if exc is None else f"{type(exc).__name__}: {exc}"
