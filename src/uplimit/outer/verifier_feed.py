"""The outer side's feed to the spot-check verifier: a random share of finished streams.

`offer` (the service's `on_stream_end` hook, on the event loop) picks a stream at `rate` with
the OS's randomness (`wire.checks.pick`: the inner cannot predict which streams are
checked), encodes it as a CHECK (`wire.checks`) and queues it. Serving never waits for the
feed and never fails because of it: an offer does not block, the queue is bounded (what does
not fit is dropped and counted unsent), and every connection error stays inside the task.
"Sent" means handed to the kernel: the verifier never acknowledges.

The verifier runs on the inner side, so everything it can do to this connection is a channel
out of the inner side with no meter: accept or refuse, close or reset, write, stop reading,
and when. The feed keeps that channel to a stated bound (docs/security.md):
- It acts only at its own ticks (`tick_s` apart, on a grid from its start): it writes at a
  tick, looks at the connection at a tick, and acts on a connection attempt's outcome at the
  tick after it. So all the outer ever observes of the verifier is at which tick a
  connection ended, and how (refused, closed, reset, bytes, stalled).
- It never reads. At each tick one non-consuming peek tells a live connection from an ended
  one; bytes waiting are an alarm (`uplimit_alarms_total{kind="verifier"}`) and end it.
- At a tick, the kernel must take everything queued for that tick (up to `tick_bytes`) at
  once, or the connection ends (a verifier that stops reading cannot modulate how much is
  sent or dropped, only end the connection).
- It connects only when it has checks to send, `reconnect_s` after the last attempt at the
  earliest, and at most `max_connections` times in any 24 hours (monotonic time). When those
  are spent, it alarms once and connects again when the window allows.
Every connection that ends is one attempt out of `max_connections`, and the outer can tell
its end apart among at most (ticks a day + 1) x 5 outcomes, so the verifier can signal at
most max_connections x log2(5 x (86400 / tick_s + 1)) bits a day: 24 x 18.7 = 449 bits a
day at the defaults (`bits_per_day`).

Not offered: retrievals of withheld reasoning (nothing was generated) and streams with no token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections import deque

from uplimit.errors import ConfigError
from uplimit.link.metrics import OuterMetrics
from uplimit.wire.checks import CHECK_PREAMBLE, CheckJob, encode_check, pick
from uplimit.wire.request import GenerationRequest

__all__ = ["VerifierFeed", "bits_per_day"]

log = logging.getLogger(__name__)

# Jobs waiting for the connection, in bytes: a verifier down for a while costs this much memory
# at most (a typical job is a few kB: prompt and answer ids, ~2 bytes each).
MAX_QUEUED_BYTES = 16 << 20
TICK_S = 1.0
# Handed to the kernel per tick; the socket's send buffer holds 4 ticks' worth (the kernel
# doubles that), so an honest verifier that reads always takes a tick's checks whole.
TICK_BYTES = 64 << 10
RECONNECT_S = 60.0
MAX_CONNECTIONS = 24  # per 24 hours
CONNECT_TIMEOUT_S = 5.0
DAY_S = 86400.0
OUTCOMES = 5  # how a connection can end: refused, closed, reset, wrote bytes, stalled


def bits_per_day(tick_s: float = TICK_S, max_connections: int = MAX_CONNECTIONS) -> float:
    """The most the verifier can signal to the outer a day (module doc)."""
    return max_connections * math.log2(OUTCOMES * (DAY_S / tick_s + 1))


class VerifierFeed:
    """Sends a random `rate` (in [0, 1], `outer.verify_rate`) of finished streams to the
    verifier at host:port, one way (module doc)."""

    def __init__(
        self,
        host: str,
        port: int,
        rate: float,
        metrics: OuterMetrics | None = None,
        *,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        tick_s: float = TICK_S,
        tick_bytes: int = TICK_BYTES,
        reconnect_s: float = RECONNECT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.host, self.port, self.rate = host, port, rate
        self.metrics = metrics
        self.max_queued_bytes = max_queued_bytes
        self.tick_s, self.tick_bytes = tick_s, tick_bytes
        self.reconnect_s, self.max_connections = reconnect_s, max_connections
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._attempts: deque[float] = deque()  # monotonic times of the last day's attempts
        self._spent = False
        self._start = 0.0
        self._tick_no = 0
        self.sent = self.unsent = self.alarms = 0
        # (tick of the attempt, tick of the end, how) of the latest connections: all that the
        # outer learns of the verifier
        self.ends: deque[tuple[int, int, str]] = deque(maxlen=1024)
        self._attempt_tick = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="uplimit-verifier-feed")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._close()
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
        return True

    def _count(self, outcome: str, n: int = 1) -> None:
        if outcome == "sent":
            self.sent += n
        else:
            self.unsent += n
        if self.metrics is not None:
            self.metrics.spotchecks.labels(outcome).inc(n)

    # --- the connection, at the feed's ticks only ------------------------------------------------

    async def _tick(self) -> None:
        """Sleep to the next tick of the grid (ticks missed while busy are skipped)."""
        loop = asyncio.get_running_loop()
        self._tick_no = max(
            self._tick_no + 1, math.floor((loop.time() - self._start) / self.tick_s) + 1
        )
        await asyncio.sleep(self._start + self._tick_no * self.tick_s - loop.time())

    async def _run(self) -> None:
        self._start = asyncio.get_running_loop().time()
        while True:
            await self._tick()
            if self._sock is not None:
                self._service()
            elif self._queue and self._may_connect():
                await self._connect()

    def _may_connect(self) -> bool:
        now = asyncio.get_running_loop().time()
        while self._attempts and self._attempts[0] <= now - DAY_S:
            self._attempts.popleft()
        if self._attempts and now < self._attempts[-1] + self.reconnect_s:
            return False
        if len(self._attempts) < self.max_connections:
            self._spent = False
            return True
        if not self._spent:  # one alarm per spent window
            self._spent = True
            self.alarms += 1
            if self.metrics is not None:
                self.metrics.alarms.labels("verifier").inc()
            log.error(
                "ALARM verifier: %d connections to the verifier in 24 hours, the most allowed"
                " (each ended by the verifier's side); no more until the window allows",
                self.max_connections,
            )
        return False

    async def _connect(self) -> None:
        self._attempts.append(asyncio.get_running_loop().time())
        self._attempt_tick = self._tick_no
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setblocking(False)
        # A bounded send buffer: a verifier that stops reading fills it within a few ticks.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * self.tick_bytes)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (self.host, self.port)),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as e:
            sock.close()
            await self._tick()  # the outcome counts at the tick after, whenever it came
            self._ended("refused", f"cannot connect to {self.host}:{self.port} ({e!r})")
            return
        await self._tick()
        self._sock = sock
        with contextlib.suppress(OSError):
            sock.sendall(CHECK_PREAMBLE)  # a few bytes into an empty send buffer
        log.info("verifier feed: connected to %s:%d", self.host, self.port)
        self._service()

    def _service(self) -> None:
        """At a tick: end a connection the verifier ended or wrote to, else send."""
        assert self._sock is not None
        try:
            waiting = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            waiting = None
        except OSError as e:
            self._ended("reset", f"connection failed ({e!r})")
            return
        if waiting == b"":
            self._ended("closed", "the verifier closed the connection")
            return
        if waiting is not None:
            self.alarms += 1
            if self.metrics is not None:
                self.metrics.alarms.labels("verifier").inc()
            self._ended(
                "wrote",
                "ALARM verifier: the spot-check verifier wrote to its one-way connection (a"
                " channel out of the inner side); connection closed unread",
                error=True,
            )
            return
        self._send()

    def _send(self) -> None:
        assert self._sock is not None
        batch, size = [], 0
        while self._queue and (not batch or size + len(self._queue[0]) <= self.tick_bytes):
            data = self._queue.popleft()
            self._queued_bytes -= len(data)
            batch.append(data)
            size += len(data)
        if not batch:
            return
        try:
            taken = self._sock.send(b"".join(batch))
        except BlockingIOError:
            taken = 0
        except OSError as e:
            self._count("unsent", len(batch))
            self._ended("reset", f"connection failed ({e!r})")
            return
        if taken < size:  # whatever part went is lost with the connection
            self._count("unsent", len(batch))
            self._ended("stalled", "the verifier did not take this tick's checks")
            return
        self._count("sent", len(batch))

    def _ended(self, how: str, message: str, *, error: bool = False) -> None:
        self.ends.append((self._attempt_tick, self._tick_no, how))
        self._close()
        if error:
            log.error("%s", message)
        else:
            log.warning("verifier feed: %s; %d checks waiting", message, len(self._queue))

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
