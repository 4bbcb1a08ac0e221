"""The active-stream table that both sides keep, so that frames need no stream ids.

The outer side creates streams (one per request candidate) and sends their specs down in
creation order; both sides append them to `pending`. Only the inner side changes which
streams are active, and it says so inside frames: "admit the next k pending streams",
"these streams ended". A stream also ends, on both sides without a word, when it emits an
end-of-sequence token or reaches its `max_tokens`. Both sides apply the same changes in the
same order, so "the i-th active stream" means the same stream on both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field

from uplimit.coding.codec import StepContext
from uplimit.coding.sampling import SamplingParams
from uplimit.errors import InternalError, InvalidRequest
from uplimit.wire.limits import MAX_PROMPT_TOKENS, MAX_STREAM_ID, MAX_STREAM_TOKENS, MAX_TOP_K

__all__ = ["StreamSpec", "StreamState", "StreamTable", "ends_stream"]


def ends_stream(tokens: Sequence[int], max_tokens: int, eos_ids: Container[int]) -> bool:
    """The end both sides know without a word: the stream's last token is an end-of-sequence
    token, or it has its `max_tokens` tokens."""
    return bool(tokens) and (tokens[-1] in eos_ids or len(tokens) >= max_tokens)


@dataclass(frozen=True)
class StreamSpec:
    """What the outer side sent down for one stream."""

    stream_id: int
    prompt: tuple[int, ...]
    params: SamplingParams
    seed: int
    max_tokens: int

    def __post_init__(self) -> None:
        # The limits of `wire.limits`: the downlink parser refuses anything past them.
        if not self.prompt:
            raise InvalidRequest("a stream needs a non-empty prompt", param="prompt")
        if len(self.prompt) > MAX_PROMPT_TOKENS:
            raise InvalidRequest(f"a prompt has at most {MAX_PROMPT_TOKENS} tokens", param="prompt")
        if not 1 <= self.max_tokens <= MAX_STREAM_TOKENS:
            raise InvalidRequest(
                f"max_tokens must be in 1..{MAX_STREAM_TOKENS}, got {self.max_tokens}",
                param="max_tokens",
            )
        if not 0 <= self.seed < 1 << 64:
            raise InvalidRequest("seed must be in [0, 2**64)", param="seed")
        if self.params.top_k > MAX_TOP_K:
            raise InvalidRequest(f"top_k must be at most {MAX_TOP_K}", param="top_k")
        if not 0 <= self.stream_id <= MAX_STREAM_ID:
            raise InternalError(f"stream id {self.stream_id} is out of range")


@dataclass
class StreamState:
    spec: StreamSpec
    tokens: list[int] = field(default_factory=list)  # coded so far
    finished: bool = False  # emitted an end-of-sequence token or reached max_tokens

    @property
    def remaining(self) -> int:
        return 0 if self.finished else self.spec.max_tokens - len(self.tokens)

    def context(self) -> StepContext:
        return StepContext(self.spec.params, self.spec.seed, len(self.tokens))


class StreamTable:
    """Pending and active streams, in the order both sides agree on."""

    def __init__(self, eos_ids: Iterable[int]) -> None:
        self.eos_ids = frozenset(eos_ids)
        self.pending: deque[StreamSpec] = deque()
        self.active: dict[int, StreamState] = {}  # insertion order = coding order
        # Stream ids increase (the outer counts them), so that no id is used twice is one
        # comparison, and the table keeps nothing of the streams that left.
        self._last_id = -1

    def add(self, spec: StreamSpec) -> None:
        if spec.stream_id <= self._last_id:
            raise InternalError(
                f"stream {spec.stream_id} after stream {self._last_id}: stream ids must increase"
            )
        self._last_id = spec.stream_id
        self.pending.append(spec)

    def admit(self, count: int) -> list[StreamState]:
        if count > len(self.pending):
            raise InternalError(f"cannot admit {count} streams: {len(self.pending)} pending")
        admitted = [StreamState(self.pending.popleft()) for _ in range(count)]
        for state in admitted:
            self.active[state.spec.stream_id] = state
        return admitted

    def append_token(self, state: StreamState, token: int) -> None:
        """Record a coded token; the stream finishes on end-of-sequence or at max_tokens."""
        state.tokens.append(token)
        state.finished = ends_stream(state.tokens, state.spec.max_tokens, self.eos_ids)

    def remove(self, stream_id: int) -> StreamState:
        return self.active.pop(stream_id)
