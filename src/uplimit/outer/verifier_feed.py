"""The outer side's feed to the spot-check verifier: a random share of finished streams.

`offer` (the service's `on_stream_end` hook, on the event loop) picks a stream at `rate` with
the OS's randomness (`wire.checks.pick`: the inner cannot predict which streams are
checked), encodes it as a CHECK (`wire.checks`) and queues it. A task sends the queue over one
TCP connection, made when there is something to send and remade after a failure, with backoff.
Serving never waits for the feed and never fails because of it: an offer does not block, the
queue is bounded (what does not fit is dropped and counted unsent), and every connection error
stays inside the task. "Sent" means handed to the connection: the verifier never acknowledges.

The connection is one-way. The outer reads from it only to learn that it closed: a byte from
the verifier is an alarm (`uplimit_alarms_total{kind="verifier"}`) and the connection is closed
after that one byte, so a verifier on the inner side cannot answer the outer through it.

Not offered: retrievals of withheld reasoning (nothing was generated) and streams with no token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from uplimit.errors import ConfigError
from uplimit.link.metrics import OuterMetrics
from uplimit.wire.checks import CHECK_PREAMBLE, CheckJob, encode_check, pick
from uplimit.wire.request import GenerationRequest

__all__ = ["VerifierFeed"]

log = logging.getLogger(__name__)

# Jobs waiting for the connection, in bytes: a verifier down for a while costs this much memory
# at most (a typical job is a few kB: prompt and answer ids, ~2 bytes each).
MAX_QUEUED_BYTES = 16 << 20
RETRY_S = 0.5  # first wait before reconnecting; doubles per failed attempt
MAX_RETRY_S = 30.0
CONNECT_TIMEOUT_S = 5.0


class VerifierFeed:
    """Sends a random `rate` (in [0, 1], `outer.verify_rate`) of finished streams to the
    verifier at host:port (module doc)."""

    def __init__(
        self,
        host: str,
        port: int,
        rate: float,
        metrics: OuterMetrics | None = None,
        *,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        retry_s: float = RETRY_S,
        max_retry_s: float = MAX_RETRY_S,
    ) -> None:
        self.host, self.port, self.rate = host, port, rate
        self.metrics = metrics
        self.max_queued_bytes = max_queued_bytes
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent = self.unsent = self.alarms = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="uplimit-verifier-feed")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._count("unsent", len(self._queue))
        self._queue.clear()

    def offer(self, request: GenerationRequest, tokens: tuple[int, ...]) -> bool:
        """Queue the stream for a check with probability `rate` (a `StreamEndHook`); never
        blocks. Returns whether it was queued."""
        if request.withheld_id is not None or not tokens or not pick(self.rate):
            return False
        try:
            data = encode_check(CheckJob(request.spec, tokens, request.best_of))
        except ConfigError as e:
            log.error("verifier feed: stream %d cannot be checked: %s", request.spec.stream_id, e)
            self._count("unsent")
            return False
        if self._queued_bytes + len(data) > self.max_queued_bytes:
            log.warning("verifier feed: queue full, stream %d not sent", request.spec.stream_id)
            self._count("unsent")
            return False
        self._queue.append(data)
        self._queued_bytes += len(data)
        self._wake.set()
        return True

    def _count(self, outcome: str, n: int = 1) -> None:
        if outcome == "sent":
            self.sent += n
        else:
            self.unsent += n
        if self.metrics is not None:
            self.metrics.spotchecks.labels(outcome).inc(n)

    # --- the connection -------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.retry_s
        while True:
            while not self._queue:  # connect only when there is something to send
                self._wake.clear()
                await self._wake.wait()
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError) as e:
                log.warning(
                    "verifier feed: cannot connect to %s:%d (%r); %d checks waiting",
                    self.host,
                    self.port,
                    e,
                    len(self._queue),
                )
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.max_retry_s)
                continue
            delay = self.retry_s
            if await self._serve(reader, writer):
                delay = self.max_retry_s  # a verifier that writes: no hurry to hear it again
            await asyncio.sleep(delay)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Send until the connection ends; returns True if the verifier wrote to it."""
        watch = asyncio.ensure_future(reader.read(1))
        send = asyncio.ensure_future(self._send(writer))
        try:
            await asyncio.wait({watch, send}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done() and not watch.cancelled() and watch.exception() is None:
                if watch.result():
                    self.alarms += 1
                    if self.metrics is not None:
                        self.metrics.alarms.labels("verifier").inc()
                    log.error(
                        "ALARM verifier: the spot-check verifier wrote to its one-way"
                        " connection (a channel out of the inner side); connection closed"
                    )
                    return True
                log.info("verifier feed: the verifier closed the connection")
            else:
                error = (watch if watch.done() else send).exception()
                log.warning("verifier feed: connection to the verifier failed: %r", error)
            return False
        finally:
            for task in (watch, send):
                task.cancel()
            await asyncio.gather(watch, send, return_exceptions=True)
            writer.close()  # what is buffered still goes out; nothing more is read

    async def _send(self, writer: asyncio.StreamWriter) -> None:
        writer.write(CHECK_PREAMBLE)
        while True:
            while self._queue:
                data = self._queue.popleft()
                self._queued_bytes -= len(data)
                try:
                    writer.write(data)
                    await writer.drain()
                except BaseException:  # failed or cancelled: this one is lost
                    self._count("unsent")
                    raise
                self._count("sent")
            self._wake.clear()
            await self._wake.wait()
