"""Both sides together: the one module that composes the inner and the outer.

Neither side imports the other (they share only `wire`); what runs both at once lives here.

- `serve_both`: `uplimit serve both`, the two services in one process joined by the real
  (metered) link over loopback.
- `LocalUplink`: an outer's `Uplink` to an `InnerService` in the same process, with the same
  loop shape as `link.transport.serve_frames` (downlink messages, then one frame per tick) and
  every option. Frames are charged to a ledger before they are handed over when one is given,
  decoded by the outer's own decoder, and kept in `frames` for tests.

The demo (`uplimit.demo`) runs the two sides as separate processes instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from uplimit.config import Config
from uplimit.errors import BudgetExhausted, DecodeMismatch, LinkClosed
from uplimit.inner.serve import serve_inner
from uplimit.inner.service import InnerService
from uplimit.link.ledger import Ledger
from uplimit.link.transport import FrameHook
from uplimit.models.base import LanguageModel
from uplimit.outer.serve import serve_outer
from uplimit.wire.frame import FrameDecoder
from uplimit.wire.receiver import LinkState
from uplimit.wire.request import GenerationRequest

__all__ = ["LocalUplink", "serve_both"]


async def serve_both(
    inner_config: Config,
    outer_config: Config,
    strong: LanguageModel,
    inner_weak: LanguageModel,
    outer_weak: LanguageModel,
    *,
    on_listening: Callable[[], None] | None = None,
) -> None:
    """Run the inner and the outer until the outer stops; each side has its own weak model
    (and config: a rollout record is per side)."""
    inner = asyncio.create_task(serve_inner(inner_config, strong, inner_weak))
    try:
        await serve_outer(outer_config, outer_weak, on_listening=on_listening)
    finally:
        await asyncio.wait_for(inner, timeout=30)


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
