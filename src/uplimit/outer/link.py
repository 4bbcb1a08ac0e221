"""What the outer service needs of a link, and the link that provides it.

`Uplink` is small on purpose: send a stream down, cancel one, learn the link's state, and get
every decoded frame through one hook. `TransportUplink` wraps `link.outer_link.OuterLink` (two
TCP connections, metered, strict); a request's options (request id, stop sequences, best_of,
a retrieval) travel as JSON in OPEN_STREAM's `extra` field. `uplimit.both.in_process` joins
it to an inner in one process, over the same link in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

from uplimit.errors import LinkClosed
from uplimit.link.outer_link import FrameHook, OuterLink
from uplimit.wire.frame import FrameContent, FrameDecoder, FrameStats
from uplimit.wire.receiver import LinkState
from uplimit.wire.request import GenerationRequest

__all__ = ["TransportUplink", "Uplink"]


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
