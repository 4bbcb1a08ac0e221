"""`uplimit serve outer`: listen for the inner side, decode, and serve the OpenAI API.

The outer listens on two link ports (the inner connects out to them) and on the HTTP port.
Until the inner has connected and accepted the codec fingerprint, requests get 503
(inner_unreachable). One link serves one inner: if the inner restarts, restart the outer too.
On exit (SIGINT/SIGTERM) the outer stops taking requests, cuts those still running after
`GRACEFUL_SHUTDOWN_S`, and sends SHUTDOWN, so the inner stops as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import uvicorn

from uplimit.coding.calibration import configured as configured_calibration
from uplimit.config import Config, link_secret_path, rollout_record_path
from uplimit.errors import ConfigError
from uplimit.link.auth import allowed_addresses, load_secret
from uplimit.link.budget import Budgets
from uplimit.link.meter import ReceiveCounter
from uplimit.link.metrics import OuterMetrics, serve_metrics
from uplimit.link.outer_link import FrameHook, OuterLink
from uplimit.models.base import LanguageModel
from uplimit.models.loading import load_configured
from uplimit.models.store import STRONG
from uplimit.outer.app import ApiSettings, create_app, server_config
from uplimit.outer.keys import KeyRing, load_keys
from uplimit.outer.link import TransportUplink
from uplimit.outer.monitor import BitsMonitor, MonitorThresholds
from uplimit.outer.rollout import Rollout
from uplimit.outer.service import OuterService
from uplimit.outer.status import Alarm, StatusBoard, status_meters
from uplimit.outer.verifier_feed import VerifierFeed
from uplimit.wire.checks import check_reproducible
from uplimit.wire.fingerprint import codec_fingerprint
from uplimit.wire.frame import FrameConfig, FrameDecoder, max_frame_bytes
from uplimit.wire.protocol import DownlinkLimits

__all__ = [
    "configured_keys",
    "configured_monitor",
    "configured_verifier_feed",
    "receive_budget_bytes",
    "serve_outer",
]

# On SIGTERM, requests still running after this long are cut (a non-streaming request only
# notices a gone client when it answers, so without a limit a stop waits for every answer).
GRACEFUL_SHUTDOWN_S = 10.0

log = logging.getLogger(__name__)


async def serve_outer(
    config: Config,
    weak: LanguageModel,
    *,
    link_host: str | None = None,
    on_listening: Callable[[], None] | None = None,
    beside: Callable[[OuterService, Rollout], Awaitable[None]] | None = None,
) -> None:
    """Serve until the HTTP server exits (a signal) or this is cancelled; then shut the link
    down (SHUTDOWN, so the inner stops too). `beside(service, rollout)` runs alongside the
    server (the relay's uplink, `relay.serve`, which passes rollouts on through `rollout`): if
    it fails, serving stops and its error is raised."""
    calibration = configured_calibration(config.models, weak.info.file_sha256)
    coding = config.coding
    frame_config = FrameConfig(
        coding.frame_tokens, weak.info.n_vocab, withheld_counts=config.reasoning is not None
    )
    session = weak.session(coding.max_streams, coding.max_context + 1)
    decoder = FrameDecoder(session, weak.info.eos_ids, calibration, frame_config)
    fingerprint = codec_fingerprint(weak.info, calibration, frame_config)
    counter = ReceiveCounter(config.path(config.link.receive_counter, "received.db"))

    metrics = OuterMetrics()
    keyring = configured_keys(config, metrics)
    feed = configured_verifier_feed(config, metrics)
    budget = receive_budget_bytes(config)
    secret = load_secret(link_secret_path(config))

    def build(hook: FrameHook) -> OuterLink:
        return OuterLink(
            fingerprint, decoder, counter, on_frame=hook, metrics=metrics, budget_bytes=budget,
            max_frame_bytes=max_frame_bytes(frame_config, coding.max_streams),
            secret=secret, allowed=allowed_addresses(config.link.inner_addresses),
            downlink_limits=DownlinkLimits(bytes_per_s=float(config.link.downlink_bytes_per_s)),
        )  # fmt: skip

    uplink = TransportUplink(build, decoder)
    rollout = Rollout(
        uplink.link, weak, frame_config, session_size=(coding.max_streams, coding.max_context + 1),
        record=rollout_record_path(config, "outer"),
        load=lambda path: load_configured(path, config.models),
        downlink_bytes_per_s=config.link.downlink_bytes_per_s,
    )  # fmt: skip
    service: OuterService | None = None
    status: StatusBoard | None = None
    exposition = None
    try:
        await uplink.link.start(
            link_host or config.link.host,
            downlink_port=config.link.downlink_port,
            uplink_port=config.link.uplink_port,
        )
        service = OuterService(
            weak, uplink, max_context=coding.max_context, max_choices=config.outer.max_choices,
            reasoning=config.reasoning, max_reasoning_tokens=config.inner.max_reasoning_tokens,
            monitor=configured_monitor(config, metrics), on_stream_end=feed.offer if feed else None,
        )  # fmt: skip
        service.start()
        status = StatusBoard(
            service, status_meters(config), lambda: _alarms(uplink, service),
            budget_bytes=budget, metrics=metrics, interval_s=config.outer.status_interval_s,
        )  # fmt: skip
        service.on_choice_end = status.stream_ended
        status.start()
        if feed is not None:
            feed.start()
        if config.outer.metrics_port:
            exposition = serve_metrics(metrics, config.outer.host, config.outer.metrics_port)
        settings = ApiSettings(
            model_name=config.outer.model_name,
            api_key=config.outer.api_key or None,
            reasoning=config.reasoning is not None,
            admin_key=config.outer.admin_key or None,
            max_body_bytes=config.outer.max_body_bytes or None,
            max_requests=config.outer.max_requests,
            max_connections=config.outer.max_connections,
            tie_nats=coding.tie_nats,
            tilt=coding.tilt,
        )
        app = create_app(service, settings, rollout, status, keyring)
        server = uvicorn.Server(
            server_config(
                app, settings, config.outer.host, config.outer.port,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            )
        )  # fmt: skip
        serving = asyncio.create_task(server.serve())
        companion = asyncio.create_task(beside(service, rollout)) if beside is not None else None
        if companion is not None:
            companion.add_done_callback(lambda t: _stop_on_failure(t, server))
        try:
            with _signals_stop(server):
                while not server.started and not serving.done():
                    await asyncio.sleep(0.05)
                if server.started and on_listening is not None:
                    on_listening()
                await asyncio.shield(serving)
        finally:  # also when cancelled: let uvicorn close its connections first
            server.should_exit = True
            await asyncio.wait([serving])
            if companion is not None:
                companion.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await companion  # raises what it failed with
    finally:
        log.info("outer: shutting the link down")
        with contextlib.suppress(Exception):
            await uplink.link.shutdown()
        await rollout.aclose()
        if status is not None:
            await status.aclose()
        if service is not None:
            await service.aclose()
        if feed is not None:
            await feed.aclose()
        if exposition is not None:
            exposition.shutdown()
        decoder.close()  # the weak models a rollout brought
        session.close()
        counter.close()


def _stop_on_failure(task: asyncio.Task[None], server: uvicorn.Server) -> None:
    if not task.cancelled() and task.exception() is not None:
        server.should_exit = True


def receive_budget_bytes(config: Config) -> int:
    """The outer's own lifetime receive budget (`link.outer_link`): `[link]
    lifetime_budget_bytes`, or with 0 the inner's default, 1 % of the strong weights. The outer
    holds no strong weights: it knows their size for the pinned pair (`models.store.STRONG`);
    for any other strong model the config must give the budget (never unlimited)."""
    if config.link.lifetime_budget_bytes:
        return config.link.lifetime_budget_bytes
    if config.models.strong == "strong":
        return Budgets.default_for(STRONG.size).lifetime_bytes
    raise ConfigError(
        f"[link] lifetime_budget_bytes = 0 leaves the budget at 1 % of the strong weights, but"
        f" the outer does not hold {config.models.strong!r}: set lifetime_budget_bytes"
    )


def _alarms(uplink: TransportUplink, service: OuterService) -> list[Alarm]:
    """Every alarm with its time: the link's, and the bits/token monitor's."""
    found = [Alarm(a.at, a.kind, a.message) for a in uplink.link.alarms]
    if service.monitor is not None:
        found += [Alarm(a.at, "bits", a.describe()) for a in service.monitor.alarms]
    return found


def configured_keys(config: Config, metrics: OuterMetrics) -> KeyRing | None:
    """The API keys of `[outer] keys_file`, their usage in `metrics`; None when unset. A
    configured file that is missing refuses to start: it is not "no limits"."""
    if not config.outer.keys_file:
        return None
    path = Path(config.outer.keys_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"outer.keys_file {path} does not exist")
    return KeyRing(load_keys(path), registry=metrics.registry)


def configured_monitor(config: Config, metrics: OuterMetrics) -> BitsMonitor | None:
    """The bits/token monitor when `[outer] monitor` names its thresholds; its alarms count in
    `uplimit_alarms_total{kind="bits"}`."""
    if not config.outer.monitor:
        return None
    thresholds = MonitorThresholds.load(Path(config.outer.monitor).expanduser())
    return BitsMonitor(thresholds, on_alarm=lambda _: metrics.alarms.labels("bits").inc())


def configured_verifier_feed(config: Config, metrics: OuterMetrics) -> VerifierFeed | None:
    """The spot-check feed when `[outer] verifier` names the verifier (docs/security.md). It
    refuses what a re-run cannot reproduce, withheld reasoning among it: those streams must not
    be offered, and with reasoning configured any stream may have some."""
    address = config.outer.verifier_address
    if address is None:
        return None
    check_reproducible(config)
    return VerifierFeed(*address, config.outer.verify_rate, metrics)


@contextlib.contextmanager
def _signals_stop(server: uvicorn.Server) -> Iterator[None]:
    """SIGINT/SIGTERM stop `server`, and nothing more, until the link is shut down.

    uvicorn handles them while it serves, but after its graceful exit it raises the signal
    again under the handler it found; the default one would kill the process before SHUTDOWN
    goes down the link, leaving the inner to find the downlink closed. This handler only asks
    the server to exit (also for a signal that comes before uvicorn has started)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread (tests run servers elsewhere)
        return
    previous = {
        sig: signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
