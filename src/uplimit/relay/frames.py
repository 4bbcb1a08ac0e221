"""The relay's frame source: the outer's streams, coded again from the tokens that came up.

Towards the outer the relay is an inner: `link.inner_link.serve_frames` drives `RelayFrames`
(from a worker thread, one call at a time, in downlink order) as it drives the inner's service.
A stream the outer opens goes into this side's `FrameEncoder` table and is opened again
towards the inner through the relay's `OuterService` (the same prompt, parameters, seed, stop
sequences and best_of, under the relay's own stream id, remembered here). What the relay's
decoder got for it is coded again by this encoder on the relay's ticks: token ids and whether
the stream ended explicitly, nothing of the inner's frames (bytes, padding, sizes, times).

Streams are admitted to the table in the outer's order, as many as it has room for, once the
relay knows how they start: released tokens, or an end, or a refusal (the frame that admits a
stream says whether it is refused: the inner's refusal, or the relay's own when it cannot open
the stream towards the inner, e.g. a prompt that does not fit its context). Their tokens go up
at most K per stream per tick, once released (`[relay] release`):

- "stream": when the stream has ended on the inner's link. The outer's frame timing then says
  when each stream ended there, and nothing about when the inner sent which frame.
- "tick": whatever has been decoded so far, at every tick (text streams to the outer's users
  as it is generated; the inner's frame timing reaches the outer rounded to the relay's ticks).

Fail closed: if the relay's link to the inner stops serving, the next frame raises, and the
serving loop ends the outer's link with END(error).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from uplimit.errors import InvalidRequest, LinkClosed, LinkError
from uplimit.outer.service import Choice, OuterService, PromptTooLong
from uplimit.wire.frame import ADMIT_BITS, FrameContent, FrameEncoder, Refusal
from uplimit.wire.request import GenerationRequest
from uplimit.wire.streams import StreamSpec, ends_stream

__all__ = ["RelayFrames"]

T = TypeVar("T")


@dataclass
class _Forward:
    """One of the outer's streams, as the relay forwards it."""

    spec: StreamSpec
    choice: Choice | None = None  # the relay's stream towards the inner; None: never opened
    tokens: tuple[int, ...] = ()  # every token, once final
    final: bool = False  # ended on the inner's link (or cancelled)
    refusal: Refusal | None = None  # refused: by the inner, or by the relay that cannot open it
    sent: int = 0  # tokens coded for the outer so far
    decoded: list[int] = field(default_factory=list)  # the choice's tokens so far ("tick")


class RelayFrames:
    """`link.inner_link.FrameSource` of the relay's uplink (module doc)."""

    def __init__(
        self,
        service: OuterService,
        encoder: FrameEncoder,
        loop: asyncio.AbstractEventLoop,
        *,
        eos_ids: frozenset[int],
        max_streams: int,
        release: str,
    ) -> None:
        self._service = service
        self._encoder = encoder
        self._loop = loop  # the service's: its coroutines run there
        self._max_streams = max_streams
        self._tick_release = release == "tick"
        self._eos = eos_ids
        self._lock = threading.Lock()  # the serving loop's thread against the event loop
        self._streams: dict[int, _Forward] = {}  # the outer's stream id -> its forward
        self._upstream: dict[int, int] = {}  # the relay's stream id -> the outer's
        self._pending: list[int] = []  # opened, not admitted: the outer's order
        self._active: list[int] = []  # the table's order

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _require_upstream(self) -> None:
        """A `LinkError` that is not `LinkClosed`: the serving loop then sends END(error)."""
        state = self._service.state
        if state.final:
            reason = self._service.uplink.reason
            raise LinkError(f"the relay's link to the inner is {state}: {reason}")

    # --- FrameSource ----------------------------------------------------------------------

    def open_stream(self, spec: StreamSpec, extra: bytes) -> None:
        request = (
            GenerationRequest.from_extra(spec, extra)
            if extra
            else GenerationRequest(spec, f"stream-{spec.stream_id}")
        )
        self._encoder.add_stream(spec)
        forward = _Forward(spec)
        with self._lock:
            self._streams[spec.stream_id] = forward
            self._pending.append(spec.stream_id)
        if request.withheld_id is not None:  # never sent by an outer whose handshake passed
            self._refuse(forward, Refusal.INVALID)
            return
        self._require_upstream()
        try:
            submission = self._run(
                self._service.submit(
                    list(spec.prompt), spec.params, request_id=request.request_id,
                    max_tokens=spec.max_tokens, stop=request.stop, seed=spec.seed,
                    best_of=request.best_of,
                )
            )  # fmt: skip
        except PromptTooLong:
            self._refuse(forward, Refusal.CONTEXT)
            return
        except InvalidRequest:
            self._refuse(forward, Refusal.INVALID)
            return
        except LinkClosed as e:
            raise LinkError(f"the relay's link to the inner: {e}") from e
        (choice,) = submission.choices
        with self._lock:
            forward.choice, forward.decoded = choice, choice.decoded
            self._upstream[choice.stream_id] = spec.stream_id

    def cancel(self, stream_id: int) -> None:
        with self._lock:
            forward = self._streams.get(stream_id)
            if forward is None or forward.final:
                return
            forward.tokens = tuple(self._visible(forward)[: forward.sent])  # what went up
            forward.final = True
        if forward.choice is not None:
            self._run(self._service.cancel(forward.choice))

    def resend(self, first: int) -> list[bytes]:
        return self._encoder.resend(first)

    def next_frame(self) -> bytes | None:
        self._require_upstream()
        with self._lock:
            content = self._plan()
        if content is None:
            return None
        data, _ = self._encoder.encode(content)
        return data

    # --- the inner's side (the event loop) ------------------------------------------------

    def stream_ended(self, request: GenerationRequest, tokens: tuple[int, ...]) -> None:
        """`OuterService.on_stream_end`: a stream ended on the relay's link to the inner."""
        with self._lock:
            sid = self._upstream.pop(request.spec.stream_id, None)
            forward = self._streams.get(sid) if sid is not None else None
            if forward is not None and not forward.final:
                forward.final, forward.tokens = True, tokens

    async def aclose(self) -> None:
        """The outer's link ended: its streams still open towards the inner are cancelled."""
        with self._lock:
            open_choices = [f.choice for f in self._streams.values() if f.choice and not f.final]
        for choice in open_choices:
            await self._service.cancel(choice)

    # --- frames ---------------------------------------------------------------------------

    def _refuse(self, forward: _Forward, why: Refusal) -> None:
        with self._lock:
            forward.refusal = why

    def _known(self, forward: _Forward) -> bool:
        """Whether the stream may be admitted: its frame must say if it is refused, so the
        relay waits until it knows how the stream starts (or, releasing whole streams, ends)."""
        choice = forward.choice
        finished = choice.finished if choice is not None else None
        if choice is not None and finished is not None and finished.refusal is not None:
            forward.refusal = finished.refusal  # the inner's (INVALID is 0: compare to None)
            self._upstream.pop(choice.stream_id, None)
        return forward.final or forward.refusal is not None or bool(self._visible(forward))

    def _visible(self, forward: _Forward) -> list[int] | tuple[int, ...]:
        if forward.final:
            return forward.tokens
        return list(forward.decoded) if self._tick_release else ()

    def _plan(self) -> FrameContent | None:
        """The next frame's content (under the lock), or None when it would say nothing."""
        k = self._encoder.config.max_tokens_per_stream
        room = min(self._max_streams - len(self._active), (1 << ADMIT_BITS) - 1)
        admit: list[int] = []
        for sid in self._pending:  # in the outer's order
            if len(admit) >= room or not self._known(self._streams[sid]):
                break
            admit.append(sid)
        del self._pending[: len(admit)]
        refused = {sid: why for sid in admit if (why := self._streams[sid].refusal) is not None}
        order = self._active + [sid for sid in admit if sid not in refused]
        tokens: dict[int, tuple[int, ...]] = {}
        ended: set[int] = set()
        retired: set[int] = set()
        for sid in order:
            forward = self._streams[sid]
            visible = self._visible(forward)
            chunk = tuple(visible[forward.sent : forward.sent + k])
            if chunk:
                tokens[sid] = chunk
                forward.sent += len(chunk)
            sent = visible[: forward.sent]
            if ends_stream(sent, forward.spec.max_tokens, self._eos):
                retired.add(sid)  # both tables drop it without a word
            elif forward.final and forward.sent == len(forward.tokens):
                ended.add(sid)
                retired.add(sid)
        if not admit and not tokens and not ended:
            return None
        self._active = [sid for sid in order if sid not in retired]
        for sid in retired | refused.keys():
            del self._streams[sid]
        return FrameContent(len(admit), tokens, frozenset(ended), refused=refused)
