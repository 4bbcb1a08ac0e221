"""Frames: everything the inner side uploads in one tick, as one arithmetic-coded message.

Uplink messages after the handshake, one after another on the byte stream with nothing
between them: each is one arithmetic-coded message that delimits itself (`coding.arith`:
the decoder finds where it ends, and the bytes must be that canonical termination, so the
parser stays strict with no length prefix). Grammar (every symbol arithmetic-coded;
probabilities fixed unless noted):

    kind      symbol      coded (P = 1 - 2**-15), raw (2**-16: a resend, see below) or
                          END (2**-16: then the reason in 3 raw bits, and nothing follows)
    admitted  flag        "no new streams" (P = 63/64); else admitted - 1 in 8 raw bits
    refusals  flags       one per admitted stream: "refused" (P = 2**-8), then why in 2 raw
                          bits (`Refusal`). The inner could not serve that stream: it leaves
                          at once, unprefilled, and the outer answers its request with an
                          error; the link and every other stream go on
    counts    flag        "uniform" (P = 31/32): one n in 0..K for all streams, each stream
                          then has min(n, its remaining) tokens, fewer if it ends with EOS;
                          n is "same as the last frame's longest" (P = 3/4) or in raw bits;
                          else one n_s per active stream from a fixed table
    ends      flag        "no explicit end" (P = 63/64); else one flag per active stream
    tokens    rounds      round r codes the r-th token of every stream that has one, in table
                          order, with `coding.codec` (weak-model guess, hit flag, miss table);
                          between rounds both sides feed the round's tokens to the weak model
                          in one batched step, so both evaluate exactly the same batches
    withheld  counts      only with `withheld_counts` (reasoning kept inside): for each stream
                          that leaves the table after this frame, in table order, how many
                          tokens it withheld: its bit length in 5 raw bits, then the bits
                          below the leading one (~5 + log2(count) bits per response)
    check     16 bits     crc32 of (frame number, decoded content), low 16 bits
    end       2-10 bits   the coder's self-delimiting termination, to a whole byte

Stream identity comes from the shared `StreamTable`: no ids on the wire. The frame number
is implicit (both sides count), and the check covers it, so a replayed, reordered or
corrupted frame, or a decoder whose weak-model numbers differ from the encoder's, fails the
check (or the coder's own canonical-message test) with probability about 1 - 2**-16.

Weak-model generations. A new weak model (a rollout, `link.rollout`) is a new codec, but
streams already open finish under the one they started with: `switch` makes a new
(weak session, calibration) generation current, every stream is coded with the generation
that was current when it was added, and an old generation is released once its last stream
leaves. Both sides call `switch` at the same point in the stream order (the outer before it
sends SWITCH down, the inner when SWITCH arrives), so they agree on every stream's generation.
A round's tokens are fed to each generation in one batched step of its own.

Recovery. A decoder that rejects frame F rolls its state back to before F, and from then on
rejects every frame but a raw resend of F. The inner side, told so on the downlink, resends
frames F, F+1, ... as raw frames: the same content with the frame number in 32 bits and
every token in ceil(log2(vocabulary)) raw bits, no model involved. They cost more, and are
metered like every other byte. Mismatches are counted on both sides. A rejected frame's end
is not known (its termination was decoded with the wrong numbers), so the receiver skips the
byte stream up to a resync marker the inner sends before the raw frames
(`wire.protocol.RESYNC`, `wire.receiver`).

Wrong text after a desync. A frame decoded with numbers that differ from the encoder's is
delivered only if its 16-bit check matches and its bytes are the canonical termination of
what was decoded: probability at most 2**-16 per rejected frame, the issue's bound. It is
detected at that frame (no text of it is delivered), or, when the stream's bytes end inside
what the decoder reads, when the next bytes arrive or after `receiver.INCOMPLETE_PATIENCE_S`
(0.5 s) without any.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from uplimit.coding.arith import ArithmeticDecoder, ArithmeticEncoder, IncompleteMessage
from uplimit.coding.calibration import FLAG_TOTAL, Calibration
from uplimit.coding.codec import Prediction, decode_token, encode_token, predict
from uplimit.coding.freqs import FrequencyTable
from uplimit.errors import CodecError, ConfigError, DecodeMismatch
from uplimit.models.base import Logits, SeqId, Session
from uplimit.wire.streams import StreamSpec, StreamState, StreamTable

CHECK_BITS = 16
FRAME_NO_BITS = 32
ADMIT_BITS = 8  # at most 2**8 streams admitted per frame: the inner admits more next tick
REFUSAL_BITS = 2
WITHHELD_LENGTH_BITS = 5  # a withheld count's bit length: counts below 2**31

# The kind symbol: coded, raw, END. The escapes cost a coded frame 4e-5 bits.
_KIND = FrequencyTable(np.array([FLAG_TOTAL - 2, 1, 1], dtype=np.int64), FLAG_TOTAL)
_CODED, _RAW, _END = 0, 1, 2
END_REASON_BITS = 3  # END's reason code, 0..7
# Probabilities of the rare branches, in units of 2**-16.
_NONE_ADMITTED = FLAG_TOTAL - FLAG_TOTAL // 64
_UNIFORM_COUNTS = FLAG_TOTAL - FLAG_TOTAL // 32
_SAME_COUNT = FLAG_TOTAL * 3 // 4  # P(uniform count = the last uniform count)
_NO_ENDS = FLAG_TOTAL - FLAG_TOTAL // 64
_ENDS = FLAG_TOTAL // 16  # P(a given stream ended explicitly | some did)
_NOT_REFUSED = FLAG_TOTAL - FLAG_TOTAL // 256  # P(an explicit end is not a refusal)


class Refusal(IntEnum):
    """Why the inner refused one stream (module doc): two bits on the wire, so the words a
    user reads are the outer's, never the inner's."""

    INVALID = 0  # the inner's own checks reject the stream's options
    CONTEXT = 1  # the prompt leaves no room in the inner's context
    FAILED = 2  # the inner's model failed on this stream alone


@dataclass(frozen=True)
class FrameConfig:
    max_tokens_per_stream: int = 16  # K: tokens one stream may carry in one frame
    n_vocab: int = 151_936
    withheld_counts: bool = False  # a retiring stream says how many tokens it withheld

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens_per_stream <= 255:
            raise ConfigError("max_tokens_per_stream must be in 1..255")

    @property
    def count_bits(self) -> int:
        return self.max_tokens_per_stream.bit_length()

    @property
    def token_bits(self) -> int:
        return (self.n_vocab - 1).bit_length()

    def count_table(self) -> FrequencyTable:
        """Per-stream counts when they are not uniform: mostly 0 (waiting) or K (full)."""
        k = self.max_tokens_per_stream
        counts = np.ones(k + 1, dtype=np.int64)
        counts[0] = counts[k] = 4 * k
        return FrequencyTable(counts, int(counts.sum()))


# Worst cases of the coded symbols, in bits: a flag's rarer branch has probability >= 2**-16
# (`FLAG_TOTAL`); a table symbol has count >= 1 of a total <= 2**32 (`coding.arith`); a coded
# token is its hit flag (a miss) plus its symbol in the miss table.
_FLAG_MAX_BITS = 16
_SYMBOL_MAX_BITS = 32
_CODED_TOKEN_MAX_BITS = _FLAG_MAX_BITS + _SYMBOL_MAX_BITS
_WITHHELD_MAX_BITS = WITHHELD_LENGTH_BITS + 30  # a count below 2**31


def max_frame_bytes(config: FrameConfig, max_streams: int) -> int:
    """The most bytes one frame can take, coded or raw, with at most `max_streams` streams in
    the table: every symbol of the grammar (module doc) at its worst, `max_tokens_per_stream`
    tokens a stream. The outer refuses longer frames unread (`wire.protocol.UplinkParser`)."""
    if max_streams < 1:
        raise ConfigError(f"max_streams must be >= 1, got {max_streams}")
    s, k = max_streams, config.max_tokens_per_stream
    bits = (
        _FLAG_MAX_BITS + FRAME_NO_BITS  # kind; a raw frame's number
        + _FLAG_MAX_BITS + ADMIT_BITS  # admitted
        + 2 * _FLAG_MAX_BITS + config.count_bits + s * _SYMBOL_MAX_BITS  # counts, either way
        + _FLAG_MAX_BITS + s * _FLAG_MAX_BITS  # ends
        + s * (_FLAG_MAX_BITS + REFUSAL_BITS)  # refusals: an honest inner admits <= s
        + s * k * max(_CODED_TOKEN_MAX_BITS, config.token_bits)  # tokens
        + (s * _WITHHELD_MAX_BITS if config.withheld_counts else 0)
        + CHECK_BITS
    )  # fmt: skip
    return -(-(bits + 4) // 8)  # + the coder's termination (<= 3 bits + rounding), whole bytes


@dataclass(frozen=True)
class FrameContent:
    """What one frame says, independent of how it was coded."""

    admitted: int = 0
    tokens: Mapping[int, tuple[int, ...]] = field(default_factory=dict)  # stream id -> tokens
    ended: frozenset[int] = frozenset()  # streams the inner ended explicitly (after tokens)
    # Withheld tokens of streams that leave the table after this frame (with
    # `withheld_counts`); zero counts are left out.
    withheld: Mapping[int, int] = field(default_factory=dict)
    # Streams refused as they were admitted (module doc), and why: they carry nothing.
    refused: Mapping[int, Refusal] = field(default_factory=dict)


@dataclass
class FrameStats:
    frame_no: int
    raw: bool
    bytes: int
    bits: int  # before padding
    token_bits: float = 0.0  # ideal cost of the token symbols
    tokens: int = 0
    hits: int = 0


def overhead_per_token(frame_bytes: int, token_bits: float, tokens: int) -> float:
    """A frame's bits beyond its tokens' own code (counts, flags, check, padding; all of a raw
    frame's), per token. Both sides charge each stream its tokens' code plus this for each of
    its tokens, so a frame's bits are attributed to streams in one way."""
    return (8 * frame_bytes - token_bits) / tokens if tokens else 0.0


class _WeakState:
    """One weak model's sequences and latest logits, one per active stream coded with it."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.seq: dict[int, SeqId] = {}
        self.logits: dict[int, Logits] = {}

    def start(self, spec: StreamSpec) -> None:
        self.seq[spec.stream_id], self.logits[spec.stream_id] = self.session.prefill(spec.prompt)

    def feed(self, tokens: Mapping[int, int]) -> None:
        """One batched step: each stream in `tokens` gets its next token."""
        out = self.session.step({self.seq[s]: t for s, t in tokens.items()})
        for s in tokens:
            self.logits[s] = out[self.seq[s]]

    def stop(self, stream_id: int) -> None:
        self.session.drop(self.seq.pop(stream_id))
        del self.logits[stream_id]

    def mark(self) -> dict[int, tuple[int, Logits]]:
        return {s: (self.session.length(q), self.logits[s]) for s, q in self.seq.items()}

    def rollback(self, mark: dict[int, tuple[int, Logits]]) -> None:
        """Return to `mark`: drop streams started since, truncate the others."""
        for s in [s for s in self.seq if s not in mark]:
            self.stop(s)
        for s, (length, logits) in mark.items():
            if self.session.length(self.seq[s]) > length:
                self.session.truncate(self.seq[s], length)
            self.logits[s] = logits


def _check_value(frame_no: int, raw: bool, order: list[int], content: FrameContent) -> int:
    """crc32 over a canonical serialization of everything the frame says."""
    parts = [struct.pack("<QBH", frame_no, raw, content.admitted)]
    for s in order:
        toks = content.tokens.get(s, ())
        parts.append(struct.pack(f"<B?{len(toks)}I", len(toks), s in content.ended, *toks))
    if content.withheld:  # absent without reasoning: those frames' checks are unchanged
        parts += [struct.pack("<IQ", s, content.withheld[s]) for s in sorted(content.withheld)]
    if content.refused:  # absent without refusals: likewise
        parts += [struct.pack("<IB", s, content.refused[s]) for s in sorted(content.refused)]
    return zlib.crc32(b"".join(parts)) & ((1 << CHECK_BITS) - 1)


class _Coder:
    """One direction of the frame grammar: the encoder passes values, the decoder gets them.

    Writing the grammar once (in `_FrameSide._walk`) over this interface keeps the two
    directions from drifting apart.
    """

    def flag(self, bit: bool | None, p_true: int) -> bool:
        raise NotImplementedError

    def uniform(self, value: int | None, n_bits: int) -> int:
        raise NotImplementedError

    def symbol(self, value: int | None, table: FrequencyTable) -> int:
        raise NotImplementedError

    def token(self, value: int | None, pred: Prediction) -> int:
        raise NotImplementedError


class _Writer(_Coder):
    def __init__(self) -> None:
        self.enc = ArithmeticEncoder()
        self.token_bits = 0.0
        self.hits = 0

    def flag(self, bit: bool | None, p_true: int) -> bool:
        assert bit is not None
        self.enc.encode(0 if bit else p_true, p_true if bit else FLAG_TOTAL - p_true, FLAG_TOTAL)
        return bit

    def uniform(self, value: int | None, n_bits: int) -> int:
        assert value is not None
        self.enc.encode_uniform(value, n_bits)
        return value

    def symbol(self, value: int | None, table: FrequencyTable) -> int:
        assert value is not None
        self.enc.encode(*table.interval(value), table.total)
        return value

    def token(self, value: int | None, pred: Prediction) -> int:
        assert value is not None
        cost = encode_token(self.enc, value, pred)
        self.token_bits += cost.bits
        self.hits += cost.hit
        return value


class _Reader(_Coder):
    def __init__(self, data: bytes) -> None:
        self.dec = ArithmeticDecoder(data)
        self.data = data
        self.raw_token_bits: int | None = None  # set for a raw resend: tokens in plain bits

    def flag(self, bit: bool | None, p_true: int) -> bool:
        if self.dec.decode_target(FLAG_TOTAL) < p_true:
            self.dec.consume(0, p_true, FLAG_TOTAL)
            return True
        self.dec.consume(p_true, FLAG_TOTAL - p_true, FLAG_TOTAL)
        return False

    def uniform(self, value: int | None, n_bits: int) -> int:
        return self.dec.decode_uniform(n_bits)

    def symbol(self, value: int | None, table: FrequencyTable) -> int:
        s = table.symbol_at(self.dec.decode_target(table.total))
        self.dec.consume(*table.interval(s), table.total)
        return s

    def token(self, value: int | None, pred: Prediction) -> int:
        if self.raw_token_bits is not None:
            return self.dec.decode_uniform(self.raw_token_bits)
        return decode_token(self.dec, pred)


@dataclass(eq=False)
class _Generation:
    """A weak model and its calibration, and who frees the session when it is retired."""

    weak: _WeakState
    calibration: Calibration
    release: Callable[[], None] | None  # None: the caller owns the session (the first one)


_Mark = tuple[
    tuple[StreamSpec, ...], dict[int, StreamState], dict[int, tuple[int, bool]], list, int
]


class _FrameSide:
    """State and grammar shared by the encoder and the decoder."""

    def __init__(
        self,
        weak_session: Session,
        eos_ids: frozenset[int],
        calibration: Calibration,
        config: FrameConfig,
    ) -> None:
        self.table = StreamTable(eos_ids)
        self._generations = [_Generation(_WeakState(weak_session), calibration, None)]
        self._generation_of: dict[int, _Generation] = {}  # stream id -> its codec, until it leaves
        self.config = config
        self.frame_no = 0
        self.last_count = 0  # tokens of the longest stream in the last frame: likely again
        self.mismatches = 0
        # Called with (stream, weak logits, prediction, token) for every token coded or
        # decoded: for measurements (e.g. per-stream cost) and monitoring.
        self.observe: Callable[[StreamState, Logits, Prediction, int], None] | None = None

    def add_stream(self, spec: StreamSpec) -> None:
        if spec.stream_id in self._generation_of:
            raise ConfigError(f"stream {spec.stream_id} is already in the table")
        self.table.add(spec)
        self._generation_of[spec.stream_id] = self._generations[-1]

    @property
    def calibration(self) -> Calibration:
        """The current generation's: what streams added now are coded with."""
        return self._generations[-1].calibration

    @property
    def generations(self) -> int:
        """Weak models in use: 1, or more while streams of an old one finish."""
        return len(self._generations)

    def switch(
        self, weak_session: Session, calibration: Calibration, release: Callable[[], None]
    ) -> None:
        """Code streams added from now on with a new weak model (module doc). `release` is
        called once no stream uses it any more and a newer one is current, or at `close`."""
        self._generations.append(_Generation(_WeakState(weak_session), calibration, release))
        self._release_idle()

    def close(self) -> None:
        """Release every generation this side was handed (not the first session)."""
        for generation in self._generations:
            if generation.release is not None:
                generation.release()
        self._generations = self._generations[:1]

    def _release_idle(self) -> None:
        in_use = set(map(id, self._generation_of.values()))
        for generation in self._generations[:-1]:
            if id(generation) not in in_use:
                self._generations.remove(generation)
                if generation.release is not None:
                    generation.release()

    def _walk(self, io: _Coder, content: FrameContent | None) -> FrameContent:
        """Code one frame's symbols (after the kind flag), applying them to the state."""
        enc = content is not None
        admitted = 0
        if not io.flag(None if not enc else content.admitted == 0, _NONE_ADMITTED):
            admitted = io.uniform(None if not enc else content.admitted - 1, ADMIT_BITS) + 1
        refused = self._admit(io, admitted, content.refused if enc else None)
        order = list(self.table.active)
        counts = self._code_counts(io, order, content)
        if not io.flag(None if not enc else not content.ended, _NO_ENDS):
            ended = frozenset(
                s for s in order if io.flag(None if not enc else s in content.ended, _ENDS)
            )
        else:
            ended = frozenset()
        tokens: dict[int, list[int]] = {s: [] for s in order}
        for round_streams in self._rounds(order, counts):
            fed: dict[int, int] = {}
            for s in round_streams:
                state = self.table.active[s]
                generation = self._generation_of[s]
                want = content.tokens[s][len(tokens[s])] if enc else None
                logits = generation.weak.logits[s]
                pred = predict(logits, state.context(), generation.calibration)
                token = io.token(want, pred)
                if not 0 <= token < self.config.n_vocab:
                    raise CodecError(f"decoded token {token} outside the vocabulary")
                if self.observe:
                    self.observe(state, logits, pred, token)
                tokens[s].append(token)
                self.table.append_token(state, token)
                if not state.finished:
                    fed[s] = token
            for generation in self._generations:
                mine = {s: t for s, t in fed.items() if self._generation_of[s] is generation}
                if mine:
                    generation.weak.feed(mine)
        withheld: dict[int, int] = {}
        if self.config.withheld_counts:
            for s in order:
                if self.table.active[s].finished or s in ended:
                    n = _code_withheld(io, content.withheld.get(s, 0) if enc else None)
                    if n:
                        withheld[s] = n
        # What the encoder's uniform n is (the longest stream's count), for raw frames too.
        self.last_count = max(map(len, tokens.values()), default=0)
        kept = {s: tuple(t) for s, t in tokens.items() if t}
        return FrameContent(admitted, kept, ended, withheld, refused)

    def _admit(
        self, io: _Coder, count: int, refused: Mapping[int, Refusal] | None
    ) -> dict[int, Refusal]:
        """The next `count` pending streams join the table, but for those refused, which
        leave it unprefilled (`refused`: the encoder's; `_retire` forgets them)."""
        if count > len(self.table.pending):
            raise CodecError(f"frame admits {count} streams, {len(self.table.pending)} pending")
        admitted = self.table.admit(count)
        out = _code_refusals(io, [state.spec.stream_id for state in admitted], refused)
        for state in admitted:
            if state.spec.stream_id in out:
                self.table.remove(state.spec.stream_id)
            else:
                self._generation_of[state.spec.stream_id].weak.start(state.spec)
        return out

    def _code_counts(
        self, io: _Coder, order: list[int], content: FrameContent | None
    ) -> dict[int, int]:
        """How many tokens each active stream may carry (a stream stops early at EOS)."""
        k = self.config.max_tokens_per_stream
        remaining = {s: self.table.active[s].remaining for s in order}
        uniform_n = None
        if content is not None:
            if any(len(t) > min(k, remaining.get(s, -1)) for s, t in content.tokens.items()):
                raise ConfigError("frame content exceeds a stream's limit or names an unknown one")
            uniform_n = _uniform_count(content, order, remaining, self.table.eos_ids, k)
        if io.flag(None if content is None else uniform_n is not None, _UNIFORM_COUNTS):
            if io.flag(None if content is None else uniform_n == self.last_count, _SAME_COUNT):
                n = self.last_count
            else:
                n = io.uniform(uniform_n, self.config.count_bits)
            if n > k:
                raise CodecError(f"frame count {n} exceeds {k}")
            return {s: min(n, remaining[s]) for s in order}
        table = self.config.count_table()
        counts = {}
        for s in order:
            want = None if content is None else len(content.tokens.get(s, ()))
            counts[s] = io.symbol(want, table)
            if counts[s] > remaining[s]:
                raise CodecError(f"frame gives stream {s} more tokens than it may have")
        return counts

    def _rounds(self, order: list[int], counts: dict[int, int]) -> Iterator[list[int]]:
        """Round r: the streams that still code an r-th token (not finished, count > r)."""
        for r in range(max(counts.values(), default=0)):
            streams = [s for s in order if counts[s] > r and not self.table.active[s].finished]
            if not streams:
                return
            yield streams

    def _mark(self) -> _Mark:
        """Enough of the state to undo a frame that failed half-way."""
        table = self.table
        lengths = {s: (len(st.tokens), st.finished) for s, st in table.active.items()}
        return (
            tuple(table.pending),
            dict(table.active),
            lengths,
            [g.weak.mark() for g in self._generations],
            self.last_count,
        )

    def _rollback(self, mark: _Mark) -> None:
        pending, active, lengths, weak, self.last_count = mark
        self.table.pending.clear()
        self.table.pending.extend(pending)
        self.table.active = active
        for s, (n, finished) in lengths.items():
            del active[s].tokens[n:]
            active[s].finished = finished
        for generation, generation_mark in zip(self._generations, weak, strict=True):
            generation.weak.rollback(generation_mark)

    def _retire(self, content: FrameContent) -> None:
        """After a frame: streams that were refused, finished or were ended leave."""
        for s in content.refused:
            del self._generation_of[s]
        for s in list(self.table.active):
            if self.table.active[s].finished or s in content.ended:
                self.table.remove(s)
                weak = self._generation_of.pop(s).weak
                if s in weak.seq:
                    weak.stop(s)
        if len(self._generations) > 1:
            self._release_idle()


def _code_refusals(
    io: _Coder, admitted: list[int], refused: Mapping[int, Refusal] | None
) -> dict[int, Refusal]:
    """Which of the streams just admitted were refused, and why (`refused`: the encoder's)."""
    if refused is not None and not refused.keys() <= set(admitted):
        raise ConfigError("a stream can only be refused in the frame that admits it")
    out = {}
    for s in admitted:
        if not io.flag(None if refused is None else s not in refused, _NOT_REFUSED):
            why = io.uniform(None if refused is None else refused[s], REFUSAL_BITS)
            if why not in Refusal._value2member_map_:
                raise CodecError(f"unknown refusal {why}")
            out[s] = Refusal(why)
    return out


def _code_withheld(io: _Coder, count: int | None) -> int:
    """A count as its bit length, then the bits below the leading one."""
    if count is not None and not 0 <= count < 1 << 31:
        raise ConfigError(f"withheld count {count} out of range")
    length = io.uniform(None if count is None else count.bit_length(), WITHHELD_LENGTH_BITS)
    if length <= 1:
        return length
    top = 1 << (length - 1)
    return top | io.uniform(None if count is None else count - top, length - 1)


def _uniform_count(
    content: FrameContent, order: list[int], remaining: dict[int, int], eos: frozenset[int], k: int
) -> int | None:
    """The n for which every stream has min(n, remaining) tokens or stops at EOS, if any."""
    n = max((len(t) for t in content.tokens.values()), default=0)
    for s in order:
        toks = content.tokens.get(s, ())
        full = len(toks) == min(n, remaining[s])
        if not (full or (toks and toks[-1] in eos)):
            return None
    return n if n <= k else None


@dataclass(frozen=True)
class _Sent:
    """What the encoder keeps of a sent frame, to resend it raw."""

    frame_no: int
    admitted: tuple[int, ...]  # streams it admitted, refused ones included
    order: tuple[int, ...]  # active streams after admission, in coding order
    content: FrameContent
    leaving: tuple[int, ...]  # streams that left the table after it, in coding order


class FrameEncoder(_FrameSide):
    """Inner side: frame contents -> coded bytes, against the weak model."""

    def __init__(self, *args: object, history: int = 256, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._history: dict[int, _Sent] = {}
        self._history_limit = history

    def encode(self, content: FrameContent) -> tuple[bytes, FrameStats]:
        io = _Writer()
        io.symbol(_CODED, _KIND)
        admitted = tuple(spec.stream_id for spec in list(self.table.pending)[: content.admitted])
        mark = self._mark()
        try:
            coded = self._walk(io, content)
            if coded != _normalized(content):
                raise ConfigError("frame content is not consistent with the stream table")
        except (CodecError, ConfigError, KeyError, IndexError) as e:
            self._rollback(mark)
            raise ConfigError(f"cannot encode frame {self.frame_no}: {e}") from e
        except BaseException:
            self._rollback(mark)  # e.g. a backend failure: leave the state as it was
            raise
        order = list(self.table.active)
        io.uniform(_check_value(self.frame_no, False, order, coded), CHECK_BITS)
        n_bits = io.enc.n_bits
        data = io.enc.finish()
        stats = FrameStats(
            self.frame_no,
            False,
            len(data),
            n_bits,
            io.token_bits,
            sum(len(t) for t in coded.tokens.values()),
            io.hits,
        )
        leaving = tuple(s for s in order if self.table.active[s].finished or s in coded.ended)
        sent = _Sent(self.frame_no, admitted, tuple(order), coded, leaving)
        self._history[self.frame_no] = sent
        self._history.pop(self.frame_no - self._history_limit, None)
        self._retire(coded)
        self.frame_no += 1
        return data, stats

    def resend(self, first: int) -> list[bytes]:
        """Raw copies of frames `first` .. latest, after the decoder rejected `first`."""
        if first not in self._history and first != self.frame_no:
            raise ConfigError(f"frame {first} is not in the resend history")
        self.mismatches += 1
        return [self._raw(self._history[n]) for n in range(first, self.frame_no)]

    def _raw(self, sent: _Sent) -> bytes:
        """Mirror of `_walk` as `_RawReader` reads it: counts per stream, tokens in raw bits."""
        io, c, order = _Writer(), sent.content, sent.order
        io.symbol(_RAW, _KIND)
        io.uniform(sent.frame_no, FRAME_NO_BITS)
        if not io.flag(c.admitted == 0, _NONE_ADMITTED):
            io.uniform(c.admitted - 1, ADMIT_BITS)
        _code_refusals(io, list(sent.admitted), c.refused)
        io.flag(False, _UNIFORM_COUNTS)
        table = self.config.count_table()
        for s in order:
            io.symbol(len(c.tokens.get(s, ())), table)
        if not io.flag(not c.ended, _NO_ENDS):
            for s in order:
                io.flag(s in c.ended, _ENDS)
        for r in range(max((len(t) for t in c.tokens.values()), default=0)):
            for s in order:
                if len(c.tokens.get(s, ())) > r:
                    io.uniform(c.tokens[s][r], self.config.token_bits)
        if self.config.withheld_counts:
            for s in sent.leaving:
                _code_withheld(io, c.withheld.get(s, 0))
        io.uniform(_check_value(sent.frame_no, True, list(order), c), CHECK_BITS)
        return io.enc.finish()


def _normalized(content: FrameContent) -> FrameContent:
    tokens = {s: tuple(t) for s, t in content.tokens.items() if t}
    withheld = {s: n for s, n in content.withheld.items() if n}
    refused = {s: Refusal(why) for s, why in content.refused.items()}
    return FrameContent(content.admitted, tokens, frozenset(content.ended), withheld, refused)


@dataclass(frozen=True)
class EndMessage:
    """The inner's last uplink message (`encode_end`): a reason code and its length."""

    reason: int
    bytes: int


def encode_end(reason: int) -> bytes:
    """END with a reason code in 0..7, coded like a frame's kind (module doc): the same bytes
    for every link, whatever came before."""
    io = _Writer()
    io.symbol(_END, _KIND)
    io.uniform(reason, END_REASON_BITS)
    return io.enc.finish()


class FrameDecoder(_FrameSide):
    """Outer side: coded bytes -> frame contents, or DecodeMismatch with state rolled back."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.awaiting_resend: int | None = None
        self.rejected = 0  # frames dropped while waiting for a resend

    def decode(self, data: bytes) -> tuple[FrameContent, FrameStats]:
        """Decode and apply one frame that is all of `data`.

        Raises DecodeMismatch (state unchanged, `awaiting_resend` set to the frame number the
        inner side must resend from) if the frame fails any check, is END, or is followed by
        more bytes.
        """
        got = self.decode_next(data, final=True, whole=True)
        assert isinstance(got, tuple)  # final: never None; whole: never END
        return got

    def decode_next(
        self, data: bytes, *, final: bool, whole: bool = False
    ) -> tuple[FrameContent, FrameStats] | EndMessage | None:
        """Decode and apply the message that `data` (a byte stream's unread part) begins with:
        a frame (its stats give its length) or END; None when `data` may end before the
        message does (state unchanged: call again with more bytes).

        A failure is a mismatch (DecodeMismatch, as `decode`) when `final` (no more bytes are
        coming, or enough are here for the longest frame) or when decoding read no bit past
        the end of `data`; otherwise more bytes could change it, and it is None.
        """
        mark = self._mark()
        io = _Reader(data)
        try:
            got = self._decode(io, whole)
        except (CodecError, ConfigError) as e:
            self._rollback(mark)
            if not final and (isinstance(e, IncompleteMessage) or io.dec.overrun_bits > 0):
                return None
            if self.awaiting_resend is None:
                self.mismatches += 1
                self.awaiting_resend = self.frame_no
            else:
                self.rejected += 1
            raise DecodeMismatch(f"frame {self.frame_no} rejected: {e}") from e
        except BaseException:
            self._rollback(mark)
            raise
        if isinstance(got, EndMessage):
            return got
        content, raw, used = got
        self._retire(content)
        stats = FrameStats(self.frame_no, raw, used, 8 * used)
        stats.tokens = sum(len(t) for t in content.tokens.values())
        self.awaiting_resend = None
        self.frame_no += 1
        return content, stats

    def _decode(self, io: _Reader, whole: bool) -> tuple[FrameContent, bool, int] | EndMessage:
        kind = io.symbol(None, _KIND)
        if kind == _END:
            reason = io.uniform(None, END_REASON_BITS)
            used = io.dec.finish()
            if whole:
                raise CodecError("END where a frame was expected")
            return EndMessage(reason, used)
        raw = kind == _RAW
        if raw:
            io.raw_token_bits = self.config.token_bits
            number = io.uniform(None, FRAME_NO_BITS)
            if number != self.frame_no:
                raise CodecError(f"raw frame {number} where frame {self.frame_no} was expected")
        elif self.awaiting_resend is not None:
            raise CodecError(f"waiting for a raw resend of frame {self.awaiting_resend}")
        content = self._walk(io, None)
        check = io.uniform(None, CHECK_BITS)
        if check != _check_value(self.frame_no, raw, list(self.table.active), content):
            raise CodecError("integrity check failed")
        used = io.dec.finish()
        if whole and used != len(io.data):
            raise CodecError(f"{len(io.data) - used} bytes after the frame")
        return content, raw, used
