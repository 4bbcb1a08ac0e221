"""The outer side's request table: API requests in, streams down, decoded text out.

For each API request the service assigns a seed (the client's, taken modulo 2**64, else a
random one) and one stream per choice (`choice_seed`), sends the streams down, and routes the
tokens of every decoded frame to the choices they belong to. A choice's events are text deltas
(as soon as a frame decodes, less any incomplete character or possible stop sequence) and one
`Finished` event.

A choice finishes when its stream ends on the link (EOS, max_tokens, or the inner's explicit
end), or earlier when the outer sees a stop sequence: then it also cancels the stream, which
matters when the link cannot tell the inner about stop sequences (`outer.link`). The reason is a
`Finish` (EOS, STOP for a stop sequence, LENGTH, CANCELLED when the client went away); the API
says "stop" for the first two and "length" otherwise. A stream the inner refused
(`wire.frame.Refusal`) finishes with REFUSED, and the API answers its request with an error;
every other stream goes on. If the link stops serving, every open choice finishes with ERROR.

Uplink bits per choice: what its tokens cost in the frames (`coding.codec.cost_bits`, from the
decoder's observer) plus its share, by tokens, of the rest of each frame.

When a stream leaves the table without a link failure or a refusal (EOS, max_tokens, the
inner's end after a stop sequence or a cancel), `on_stream_end` gets its request and every
token decoded for it, past a stop sequence too: what the spot-check feed
(`outer.verifier_feed`) samples from.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from uplimit.coding.codec import Prediction, cost_bits
from uplimit.coding.generate import Finish
from uplimit.coding.sampling import SamplingParams
from uplimit.errors import InvalidRequest, LinkClosed
from uplimit.models.base import LanguageModel, Logits
from uplimit.outer.link import Uplink
from uplimit.outer.monitor import BitsMonitor
from uplimit.outer.text import TextAssembler
from uplimit.wire.frame import FrameContent, FrameStats, Refusal, overhead_per_token
from uplimit.wire.receiver import LinkState
from uplimit.wire.request import GenerationRequest, choice_seed
from uplimit.wire.streams import StreamSpec, StreamState, ends_stream

__all__ = ["Choice", "Finished", "OuterService", "PromptTooLong", "StreamEndHook", "Submission"]

SEED_MODULUS = 1 << 64

log = logging.getLogger(__name__)

# (the stream's request, every token decoded for it); called on the event loop
StreamEndHook = Callable[[GenerationRequest, tuple[int, ...]], None]


class PromptTooLong(InvalidRequest):
    """The prompt and the requested tokens do not fit the context."""


@dataclass(frozen=True)
class Finished:
    reason: Finish
    tokens: int  # uploaded tokens of this choice (a stop sequence's own token included)
    bits: float  # uplink bits this choice cost, its share of each frame's overhead included
    payload_bits: float  # of which its tokens' own code
    error: str = ""  # set when reason is ERROR
    withheld: int | None = None  # reasoning tokens kept inside; None: no reasoning configured
    refusal: Refusal | None = None  # set when reason is REFUSED: why, in the inner's two bits


@dataclass
class Choice:
    index: int
    stream_id: int
    seed: int
    max_tokens: int
    text: TextAssembler
    request: GenerationRequest  # as sent down
    events: asyncio.Queue[str | Finished] = field(default_factory=asyncio.Queue)
    finished: Finished | None = None
    last_token: int | None = None
    decoded: list[int] = field(default_factory=list)  # its stream's, past a stop sequence too
    bits: float = 0.0
    payload_bits: float = 0.0
    withheld: int | None = None  # said by its stream's last frame

    @property
    def received(self) -> int:
        return len(self.decoded)


@dataclass(frozen=True)
class Submission:
    request_id: str
    seed: int
    prompt_tokens: int
    choices: tuple[Choice, ...]


class OuterService:
    def __init__(
        self,
        weak: LanguageModel,
        uplink: Uplink,
        *,
        max_context: int,
        max_choices: int = 8,
        reasoning: tuple[str, str] | None = None,
        max_reasoning_tokens: int = 1024,
        monitor: BitsMonitor | None = None,
        on_stream_end: StreamEndHook | None = None,
    ) -> None:
        self.model = weak
        self.monitor = monitor  # sees every decoded token's cost, rejected frames' too
        self.on_stream_end = on_stream_end  # module doc
        # The same moment, with the choice's bits; set by the status board (`outer.status`).
        self.on_choice_end: Callable[[Choice], None] | None = None
        self.reasoning = reasoning
        self.max_reasoning_tokens = max_reasoning_tokens
        self.eos = weak.info.eos_ids
        self.uplink = uplink
        self.max_context = max_context
        self.max_choices = max_choices
        self._ids = itertools.count()
        self._open: dict[int, Choice] = {}  # stream id -> choice, until its stream ends
        self._bits: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        uplink.decoder.observe = self._observe
        uplink.set_frame_hook(self._on_frame)
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Watch the link: when it stops serving, every open choice ends with an error."""
        self._watch = asyncio.create_task(self._watch_link())

    @property
    def state(self) -> LinkState:
        return self.uplink.state

    async def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        request_id: str,
        max_tokens: int | None,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
        n: int = 1,
        best_of: int = 1,
    ) -> Submission:
        """Send the request's streams down; raises PromptTooLong, InvalidRequest, LinkClosed."""
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        if not 1 <= n <= self.max_choices:
            raise InvalidRequest(f"n must be in 1..{self.max_choices}, got {n}")
        room = self.max_context - len(prompt) - 1
        if max_tokens is None:
            max_tokens = room
        if max_tokens < 1 or max_tokens > room:
            raise PromptTooLong(
                f"this model's context is {self.max_context} tokens; the prompt has"
                f" {len(prompt)} and {max_tokens} were asked for"
            )
        self._require_serving()
        base = secrets.randbits(64) if seed is None else seed % SEED_MODULUS
        choices = []
        for i in range(n):
            sid = next(self._ids)
            spec = StreamSpec(sid, tuple(prompt), params, choice_seed(base, i), max_tokens)
            request = GenerationRequest(spec, request_id, stop, best_of)
            text = TextAssembler(self.model.token_bytes, self.eos, stop)
            choice = Choice(i, sid, spec.seed, max_tokens, text, request)
            self._open[sid] = choice
            try:
                await self.uplink.open(request)
            except BaseException:
                del self._open[sid]
                for c in choices:
                    await self.cancel(c)
                raise
            choices.append(choice)
        return Submission(request_id, base, len(prompt), tuple(choices))

    async def retrieve(self, withheld_id: str) -> Submission:
        """Ask the inner for the reasoning it withheld under `withheld_id` (an upload).

        The stream's prompt is the open marker, so the weak model codes the reasoning as
        reasoning; greedy parameters, since there is nothing to sample.
        """
        if self.reasoning is None:
            raise InvalidRequest("this server does not keep reasoning inside")
        self._require_serving()
        sid = next(self._ids)
        prompt = tuple(self.model.tokenize(self.reasoning[0]))
        spec = StreamSpec(sid, prompt, SamplingParams(), 0, self.max_reasoning_tokens)
        request_id = f"withheld-{withheld_id}"
        request = GenerationRequest(spec, request_id, withheld_id=withheld_id)
        text = TextAssembler(self.model.token_bytes, (), ())
        choice = Choice(0, sid, 0, spec.max_tokens, text, request)
        self._open[sid] = choice
        try:
            await self.uplink.open(request)
        except BaseException:
            del self._open[sid]
            raise
        return Submission(request_id, 0, len(prompt), (choice,))

    async def cancel(self, choice: Choice) -> None:
        """The client went away: stop the stream (the inner ends it at its next frame)."""
        if choice.finished is None:
            self._finish(choice, Finish.CANCELLED)
        if choice.stream_id in self._open:
            await self.uplink.cancel(choice.stream_id)

    def active_streams(self) -> list[dict[str, Any]]:
        """The streams open on the link now, oldest first (the status page)."""
        return [
            {
                "stream_id": sid,
                "request_id": c.request.request_id,
                "temperature": c.request.spec.params.temperature,
                "tokens": c.received,
                "max_tokens": c.max_tokens,
                "bits": c.bits,
            }
            for sid, c in self._open.items()
        ]

    def _require_serving(self) -> None:
        if self.uplink.state is not LinkState.SERVING:
            raise LinkClosed(f"link {self.uplink.state}: {self.uplink.reason}")

    # --- decoded frames ---------------------------------------------------------------------

    def _observe(self, state: StreamState, logits: Logits, pred: Prediction, token: int) -> None:
        # In the decoding thread; bits are keyed by frame, since a rejected frame is observed
        # too but never delivered.
        frame_no = self.uplink.decoder.frame_no
        bits = cost_bits(pred, token)
        self._bits[frame_no][state.spec.stream_id] += bits
        if self.monitor is not None:
            self.monitor.add(state.spec, bits)

    def _on_frame(self, content: FrameContent, stats: FrameStats) -> None:
        bits = self._bits.pop(stats.frame_no, {})
        for stale in [f for f in list(self._bits) if f < stats.frame_no]:
            del self._bits[stale]
        n_tokens = sum(map(len, content.tokens.values()))
        token_bits = 0.0 if stats.raw else sum(bits.values())
        shared = overhead_per_token(stats.bytes, token_bits, n_tokens)
        if self.reasoning:  # before the tokens: a stop sequence among them finishes the choice
            for sid in self._open.keys() & content.withheld.keys():
                self._open[sid].withheld = content.withheld[sid]
        for sid, toks in content.tokens.items():
            choice = self._open.get(sid)
            if choice is None:
                continue
            payload = 0.0 if stats.raw else bits.get(sid, 0.0)
            self._deliver(choice, toks, payload, shared * len(toks))
        for sid in list(self._open):
            choice = self._open[sid]
            if sid in content.ended or sid in content.refused or self._ends_implicitly(choice):
                del self._open[sid]
                if self.monitor is not None:
                    self.monitor.end(sid)
                refused = content.refused.get(sid)
                if refused is not None and choice.finished is None:
                    self._finish(choice, Finish.REFUSED, refusal=refused)
                elif choice.finished is None:  # else a stop sequence finished it already
                    self._finish(
                        choice, Finish.EOS if choice.last_token in self.eos else Finish.LENGTH
                    )
                if self.on_stream_end is not None and refused is None:  # nothing to check
                    self.on_stream_end(choice.request, tuple(choice.decoded))
                if self.on_choice_end is not None:
                    self.on_choice_end(choice)

    def _deliver(
        self, choice: Choice, tokens: tuple[int, ...], payload: float, overhead: float
    ) -> None:
        choice.last_token = tokens[-1]
        choice.decoded.extend(tokens)
        choice.payload_bits += payload
        choice.bits += payload + overhead
        if choice.finished is not None:
            return  # stopped already: the inner uploaded past the stop before it knew
        text = choice.text.feed(tokens)
        if text:
            choice.events.put_nowait(text)
        if choice.text.stopped:
            self._finish(choice, Finish.STOP)
            task = asyncio.ensure_future(self.uplink.cancel(choice.stream_id))
            task.add_done_callback(lambda t: t.exception())

    def _ends_implicitly(self, choice: Choice) -> bool:
        return ends_stream(choice.decoded, choice.max_tokens, self.eos)

    def _finish(
        self, choice: Choice, reason: Finish, error: str = "", refusal: Refusal | None = None
    ) -> None:
        failed = reason in (Finish.ERROR, Finish.REFUSED)
        tail = choice.text.finish()
        if tail and not failed:
            choice.events.put_nowait(tail)
        withheld = None
        if self.reasoning and not failed:
            withheld = choice.withheld or 0  # a frame leaves zero counts out
        choice.finished = Finished(
            reason, choice.text.tokens, choice.bits, choice.payload_bits, error, withheld, refusal
        )
        choice.events.put_nowait(choice.finished)

    async def _watch_link(self) -> None:
        state = await self.uplink.wait_final()
        # Users read a fixed text per state (`outer.api_errors`); the reason is for operators.
        log.warning("the link is %s: %s", state, self.uplink.reason)
        for choice in self._open.values():
            if choice.finished is None:
                self._finish(choice, Finish.ERROR, f"link {state}: {self.uplink.reason}")
        self._open.clear()

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
