"""`uplimit serve outer`: listen for the inner side, decode, and serve the OpenAI API.

The outer listens on two link ports (the inner connects out to them) and on the HTTP port.
Until the inner has connected and accepted the codec fingerprint, requests get 503
(inner_unreachable). One link serves one inner: if the inner restarts, restart the outer too.
On exit (SIGINT/SIGTERM) the outer sends SHUTDOWN, so the inner stops as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import uvicorn

from uplimit.config import Config, load_calibration
from uplimit.link.meter import ReceiveCounter
from uplimit.link.metrics import OuterMetrics, serve_metrics
from uplimit.link.transport import OuterLink
from uplimit.models.base import LanguageModel
from uplimit.outer.app import ApiSettings, create_app
from uplimit.outer.link import FrameHook, TransportUplink
from uplimit.outer.monitor import BitsMonitor, MonitorThresholds
from uplimit.outer.service import OuterService
from uplimit.wire.fingerprint import codec_fingerprint
from uplimit.wire.frame import FrameConfig, FrameDecoder

__all__ = ["serve_outer"]

log = logging.getLogger(__name__)


async def serve_outer(
    config: Config,
    weak: LanguageModel,
    *,
    link_host: str | None = None,
    on_listening: Callable[[], None] | None = None,
) -> None:
    """Serve until the HTTP server exits (a signal) or this is cancelled; then shut the link
    down (SHUTDOWN, so the inner stops too)."""
    calibration = load_calibration(config, weak.info.file_sha256)
    coding = config.coding
    frame_config = FrameConfig(
        coding.frame_tokens, weak.info.n_vocab, withheld_counts=config.reasoning is not None
    )
    session = weak.session(coding.max_streams, coding.max_context + 1)
    decoder = FrameDecoder(session, weak.info.eos_ids, calibration, frame_config)
    fingerprint = codec_fingerprint(weak.info, calibration, frame_config)
    counter = ReceiveCounter(config.path(config.link.receive_counter, "received.db"))

    metrics = OuterMetrics()
    budget = config.link.lifetime_budget_bytes or None  # 0: the inner's default, unknown here

    def build(hook: FrameHook) -> OuterLink:
        return OuterLink(
            fingerprint, decoder, counter, on_frame=hook, metrics=metrics, budget_bytes=budget
        )

    uplink = TransportUplink(build, decoder)
    service: OuterService | None = None
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
            monitor=_monitor(config, metrics),
        )  # fmt: skip
        service.start()
        if config.outer.metrics_port:
            exposition = serve_metrics(metrics, config.outer.host, config.outer.metrics_port)
        settings = ApiSettings(
            model_name=config.outer.model_name,
            api_key=config.outer.api_key or None,
            reasoning=config.reasoning is not None,
        )
        app = create_app(service, settings)
        server = uvicorn.Server(
            uvicorn.Config(app, host=config.outer.host, port=config.outer.port, log_level="warning")
        )
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started and not serving.done():
                await asyncio.sleep(0.05)
            if server.started and on_listening is not None:
                on_listening()
            await asyncio.shield(serving)
        finally:  # also when cancelled: let uvicorn close its connections first
            server.should_exit = True
            await asyncio.wait([serving])
    finally:
        log.info("outer: shutting the link down")
        with contextlib.suppress(Exception):
            await uplink.link.shutdown()
        if service is not None:
            await service.aclose()
        if exposition is not None:
            exposition.shutdown()
        session.close()
        counter.close()


def _monitor(config: Config, metrics: OuterMetrics) -> BitsMonitor | None:
    """The bits/token monitor when `[outer] monitor` names its thresholds; its alarms count in
    `uplimit_alarms_total{kind="bits"}`."""
    if not config.outer.monitor:
        return None
    thresholds = MonitorThresholds.load(Path(config.outer.monitor).expanduser())
    return BitsMonitor(thresholds, on_alarm=lambda _: metrics.alarms.labels("bits").inc())
