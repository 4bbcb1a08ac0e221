"""`uplimit serve verifier`: the spot-check verifier as a service (docs/security.md).

The outer side sends a random share of finished streams here (`outer.verifier_feed`), as CHECK
messages (`wire.checks`). The verifier re-runs each on its own copy of the strong model
(`inner.spotcheck.verify`, one job at a time, off the event loop) and records every verdict as
one flushed JSON line in the verdict file and a log line. A disagreement is an alarm: logged at
ERROR and counted in `uplimit_alarms_total{kind="spotcheck"}`.

The connection is one-way: the verifier never writes a byte to it (an answer channel from the
inner side to the outer would be an upload with no meter). A malformed connection is closed
and alarmed (kind "protocol"); the other connections go on.

A re-run must produce what the inner generated, so the verifier refuses what it cannot
reproduce: gauged serving copies (`[gauge] period_s` > 0: a copy re-gauged per period is not
bit-identical to the master file at T > 0, docs/gauge.md) and withheld reasoning (the uploaded
tokens are not the strong model's plain output). With speculative drafts (`[inner]
draft_tokens` > 0) it drafts exactly as the inner does, and streams with compression-aware
decoding (tie_nats, tilt) it re-runs with the weak model beside the strong one, as the inner
generated them; `serve verifier` loads the weak model for both.

Metrics, in its own registry, on `metrics_host:metrics_port` when the port is set (an inner-side
port: keep it off the outer's network)::

    uplimit_checks_total{outcome}    agree | disagree | error (a job that could not be re-run)
    uplimit_checks_dropped_total     jobs dropped because max_queue jobs were waiting
    uplimit_alarms_total{kind}       spotcheck | check_error | protocol
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry, Counter, start_http_server

from uplimit.config import Config
from uplimit.errors import ConfigError, ProtocolError
from uplimit.inner.serve import scheduler_config
from uplimit.inner.spotcheck import Speculation, Verdict, verify
from uplimit.models.base import LanguageModel
from uplimit.wire.checks import CheckJob, CheckParser, check_reproducible

__all__ = ["Verifier", "VerifierMetrics", "serve_verifier"]

log = logging.getLogger(__name__)

_READ_BYTES = 1 << 16


class VerifierMetrics:
    """The verifier's metrics (module doc), in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.checks = Counter(
            "uplimit_checks", "Streams re-run, by outcome.", ["outcome"], registry=r
        )
        self.dropped = Counter(
            "uplimit_checks_dropped", "Checks dropped: the queue was full.", registry=r
        )
        self.alarms = Counter("uplimit_alarms", "Alarms raised, by kind.", ["kind"], registry=r)
        for outcome in ("agree", "disagree", "error"):  # every series exists from the start
            self.checks.labels(outcome)
        for kind in ("spotcheck", "check_error", "protocol"):
            self.alarms.labels(kind)


class Verifier:
    """Listens for checks, re-runs them one at a time, records the verdicts (module doc)."""

    def __init__(
        self,
        config: Config,
        strong: LanguageModel,
        weak: LanguageModel | None = None,
        *,
        metrics: VerifierMetrics | None = None,
    ) -> None:
        check_reproducible(config)
        speculation = None
        if config.inner.draft_tokens:
            if weak is None:
                raise ConfigError(
                    "[inner] draft_tokens > 0: the inner's output depends on its weak model's"
                    " drafts, so the verifier needs the weak model to re-run it"
                )
            speculation = Speculation(weak, scheduler_config(config))
        self._check: Callable[[CheckJob], Verdict] = functools.partial(
            verify,
            strong,
            max_context=config.coding.max_context,
            speculation=speculation,
            weak=weak,  # for streams with tie_nats or tilt
        )
        self.config = config.verifier
        self.n_vocab = strong.info.n_vocab
        self.metrics = metrics or VerifierMetrics()
        self.verdicts_path = config.path(config.verifier.verdicts, "verdicts.jsonl")
        self._queue: asyncio.Queue[CheckJob] = asyncio.Queue(config.verifier.max_queue)
        self._server: asyncio.Server | None = None
        self._worker: asyncio.Task[None] | None = None
        self.port: int | None = None  # the one listened on, once started
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="uplimit-verify")
        self._verdicts = self.verdicts_path.open("a", encoding="utf-8")

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._connection, self.config.host, self.config.port
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._worker = asyncio.create_task(self._work())

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await asyncio.to_thread(self._model_thread.shutdown)  # a re-run under way finishes
        self._verdicts.close()

    # --- connections ----------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        parser = CheckParser(n_vocab=self.n_vocab)
        try:
            while data := await reader.read(_READ_BYTES):
                for job in parser.feed(data):
                    self._enqueue(job)
            parser.eof()
        except ProtocolError as e:
            self._alarm("protocol", f"malformed checks from {peer}, connection closed: {e}")
        except ConnectionError as e:
            log.warning("verifier: connection from %s failed: %s", peer, e)
        except asyncio.CancelledError:
            pass  # stopping; ended, not cancelled: Python 3.11's server logs a cancelled handler
        finally:
            writer.close()  # nothing was ever written to it
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _enqueue(self, job: CheckJob) -> None:
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.metrics.dropped.inc()
            log.warning(
                "verifier: %d checks waiting; stream %d dropped unchecked",
                self._queue.qsize(),
                job.spec.stream_id,
            )

    # --- checks ---------------------------------------------------------------------------------

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            error = ""
            try:
                verdict = await loop.run_in_executor(self._model_thread, self._check, job)
            except Exception as e:  # a job that cannot be re-run is reported, never passed
                error = f"{type(e).__name__}: {e}"
                verdict = Verdict(job.spec.stream_id, False, len(job.tokens), None, time.time())
            self._record(job, verdict, error)

    def _record(self, job: CheckJob, v: Verdict, error: str) -> None:
        line: dict[str, object] = {
            "time": v.at,
            "stream_id": v.stream_id,
            "seed": job.spec.seed,
            "agree": v.agree,
            "checked_tokens": v.checked_tokens,
            "first_difference": v.first_difference,
        }
        if error:
            line["error"] = error
        self._verdicts.write(json.dumps(line) + "\n")
        self._verdicts.flush()
        if error:
            self.metrics.checks.labels("error").inc()
            self._alarm("check_error", f"stream {v.stream_id} could not be re-run: {error}")
        elif v.agree:
            self.metrics.checks.labels("agree").inc()
            log.info("verifier: %s", v.describe())
        else:
            self.metrics.checks.labels("disagree").inc()
            self._alarm("spotcheck", v.describe())

    def _alarm(self, kind: str, message: str) -> None:
        self.metrics.alarms.labels(kind).inc()
        log.error("verifier: ALARM %s: %s", kind, message)


async def serve_verifier(
    config: Config,
    strong: LanguageModel,
    weak: LanguageModel | None = None,
    *,
    on_listening: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGTERM, SIGINT or cancellation; `on_listening(port)` once it listens."""
    verifier = Verifier(config, strong, weak)
    exposition = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        await verifier.start()
        if config.verifier.metrics_port:
            exposition, _ = start_http_server(
                config.verifier.metrics_port,
                addr=config.verifier.metrics_host,
                registry=verifier.metrics.registry,
            )
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        if on_listening is not None:
            on_listening(verifier.port or 0)
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        if exposition is not None:
            exposition.shutdown()
        await verifier.aclose()
