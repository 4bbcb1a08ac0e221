"""What the outer service needs of a link, and two links that provide it.

`Uplink` is small on purpose: send a stream down, cancel one, learn the link's state, and get
every decoded frame through one hook. Two implementations:

- `TransportUplink` wraps `link.transport.OuterLink` (two TCP connections, metered, strict);
  a request's options (request id, stop sequences, best_of, a retrieval) travel as JSON in
  OPEN_STREAM's `extra` field.
- `LocalUplink` runs an `InnerService` in the same process, with the same loop shape as
  `transport.serve_frames` (downlink messages, then one frame per tick) and every option.
  Frames are charged to a ledger before they are handed over when one is given, decoded by
  the outer's own decoder, and kept in `frames` for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from uplimit.errors import BudgetExhausted, DecodeMismatch, LinkClosed
from uplimit.inner.request import GenerationRequest
from uplimit.inner.service import InnerService
from uplimit.link.ledger import Ledger
from uplimit.link.transport import OuterLink
from uplimit.wire.frame import FrameContent, FrameDecoder, FrameStats
from uplimit.wire.receiver import LinkState

__all__ = ["FrameHook", "LocalUplink", "TransportUplink", "Uplink"]

FrameHook = Callable[[FrameContent, FrameStats], None]


class Uplink(Protocol):
    decoder: FrameDecoder

    @property
    def state(self) -> LinkState: ...

    @property
    def reason(self) -> str: ...

    def set_frame_hook(self, hook: FrameHook) -> None:
        """Every decoded frame goes to `hook`, in order, on the event loop."""
        ...

    async def open(self, request: GenerationRequest) -> None:
        """Add the stream to the decoder's table and send it down (raises LinkClosed)."""
        ...

    async def cancel(self, stream_id: int) -> None: ...

    async def wait_final(self) -> LinkState:
        """Until the link is exhausted, closed or failed."""
        ...


class TransportUplink:
    """`Uplink` over the real transport (module doc)."""

    def __init__(self, build: Callable[[FrameHook], OuterLink], decoder: FrameDecoder) -> None:
        """`build(on_frame)` makes the `OuterLink` (decoding with `decoder`)."""
        self.decoder = decoder
        self._hook: FrameHook | None = None
        self.link = build(self._deliver)

    def _deliver(self, content: FrameContent, stats: FrameStats) -> None:
        if self._hook is not None:
            self._hook(content, stats)

    @property
    def state(self) -> LinkState:
        return self.link.state

    @property
    def reason(self) -> str:
        return self.link.reason

    def set_frame_hook(self, hook: FrameHook) -> None:
        self._hook = hook

    async def open(self, request: GenerationRequest) -> None:
        await self.link.open_stream(request.spec, request.extra())

    async def cancel(self, stream_id: int) -> None:
        with contextlib.suppress(LinkClosed):  # a closed link ends every stream anyway
            await self.link.cancel(stream_id)

    async def wait_final(self) -> LinkState:
        return await self.link.wait_final()


class LocalUplink:
    """`Uplink` to an `InnerService` in this process (module doc). `start` it first."""

    def __init__(
        self,
        inner: InnerService,
        decoder: FrameDecoder,
        *,
        tick_s: float = 0.01,
        ledger: Ledger | None = None,
    ) -> None:
        self.inner = inner
        self.decoder = decoder
        self.tick_s = tick_s
        self.ledger = ledger
        self.frames: list[bytes] = []  # everything that crossed, in order
        self._down: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self._hook: FrameHook | None = None
        self._state = LinkState.SERVING
        self._reason = "serving"
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def reason(self) -> str:
        return self._reason

    def set_frame_hook(self, hook: FrameHook) -> None:
        self._hook = hook

    async def open(self, request: GenerationRequest) -> None:
        self._require_serving()
        await self._down.put(("open", request))

    async def cancel(self, stream_id: int) -> None:
        if self._state is LinkState.SERVING:
            await self._down.put(("cancel", stream_id))

    def _require_serving(self) -> None:
        if self._state is not LinkState.SERVING:
            raise LinkClosed(f"link {self._state}: {self._reason}")

    async def wait_final(self) -> LinkState:
        while not self._state.final:
            await self._changed.wait()
        return self._state

    def start(self) -> None:
        self.inner.start()
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        resends: list[bytes] = []
        try:
            while True:
                while not self._down.empty():
                    kind, arg = self._down.get_nowait()
                    if kind == "open":
                        assert isinstance(arg, GenerationRequest)
                        self.decoder.add_stream(arg.spec)
                        await asyncio.to_thread(self.inner.open_stream, arg.spec, arg.extra())
                    else:
                        await asyncio.to_thread(self.inner.cancel, arg)
                if resends:
                    frame = resends.pop(0)
                else:
                    frame = await asyncio.to_thread(self.inner.next_frame)
                if frame is None:
                    await asyncio.sleep(self.tick_s)
                    continue
                if self.ledger is not None:  # charged before it crosses
                    await asyncio.to_thread(self.ledger.charge, len(frame), note="frame")
                self.frames.append(frame)
                try:
                    content, stats = await asyncio.to_thread(self.decoder.decode, frame)
                except DecodeMismatch:
                    if not resends:
                        first = self.decoder.awaiting_resend
                        resends = await asyncio.to_thread(self.inner.resend, first)
                    continue
                if self._hook is not None:
                    self._hook(content, stats)
                await asyncio.sleep(self.tick_s)
        except BudgetExhausted as e:
            self._set(LinkState.EXHAUSTED, f"upload budget exhausted ({e.limit})")
        except asyncio.CancelledError:
            self._set(LinkState.CLOSED, "closed")
            raise
        except Exception as e:  # fail closed, and say why
            self._set(LinkState.FAILED, f"inner failed: {e!r}")

    def _set(self, state: LinkState, reason: str) -> None:
        self._state, self._reason = state, reason
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._state is LinkState.SERVING:
            self._set(LinkState.CLOSED, "closed")
        await asyncio.to_thread(self.inner.close)
