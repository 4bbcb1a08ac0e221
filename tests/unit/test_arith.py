"""The arithmetic coder: exact round trips, size bounds, pinned bytes, strict decoding, and
messages that delimit themselves."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import constriction
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uplimit.coding.arith import (
    MAX_TOTAL,
    ArithmeticDecoder,
    ArithmeticEncoder,
    IncompleteMessage,
)
from uplimit.errors import CodecError

# A step is either (cumulative counts of a table, symbol) or (n_bits, value) for a uniform
# symbol. The decoder gets the tables and bit widths, never the symbols.
Step = tuple[Sequence[int], int] | tuple[int, int]


def encode(steps: list[Step]) -> tuple[bytes, int, float]:
    """(message, n_bits, ideal cost in bits)."""
    enc = ArithmeticEncoder()
    ideal = 0.0
    for spec, sym in steps:
        if isinstance(spec, int):
            enc.encode_uniform(sym, spec)
            ideal += spec
        else:
            low, freq, total = spec[sym], spec[sym + 1] - spec[sym], spec[-1]
            enc.encode(low, freq, total)
            ideal -= math.log2(freq / total)
    n_bits = enc.n_bits
    data = enc.finish()
    assert enc.n_bits == n_bits
    return data, n_bits, ideal


def decode(data: bytes, specs: list[Sequence[int] | int], length: int | None = None) -> list[int]:
    """Decode one symbol per spec, then check that the data start with the canonical message
    of `length` bytes (default: all of them)."""
    dec = ArithmeticDecoder(data)
    out = []
    for spec in specs:
        if isinstance(spec, int):
            out.append(dec.decode_uniform(spec))
        else:
            target = dec.decode_target(spec[-1])
            sym = int(np.searchsorted(spec, target, side="right")) - 1
            dec.consume(spec[sym], spec[sym + 1] - spec[sym], spec[-1])
            out.append(sym)
    assert dec.finish() == (len(data) if length is None else length)
    return out


def round_trip(steps: list[Step]) -> tuple[bytes, int, float]:
    data, n_bits, ideal = encode(steps)
    assert 8 * len(data) == n_bits
    specs, symbols = [spec for spec, _ in steps], [sym for _, sym in steps]
    assert decode(data, specs) == symbols
    # Whatever follows (the next message) changes nothing: the message delimits itself.
    for tail in (b"\x00", b"\xff" * 9, b"\x80\x01\x7f"):
        assert decode(data + tail, specs, len(data)) == symbols
    return data, n_bits, ideal


@st.composite
def table_steps(draw: st.DrawFn) -> Step:
    """A table of up to 7 symbols with any total up to 2**32 (freq can be 1 of 2**32)."""
    total = draw(st.one_of(st.integers(1, 16), st.integers(1, MAX_TOTAL), st.just(MAX_TOTAL)))
    cuts = draw(st.lists(st.integers(1, max(1, total - 1)), max_size=6)) if total > 1 else []
    cum = (0, *sorted(set(cuts)), total)
    return cum, draw(st.integers(0, len(cum) - 2))


@st.composite
def uniform_steps(draw: st.DrawFn) -> Step:
    n_bits = draw(st.integers(1, 32))
    return n_bits, draw(st.integers(0, (1 << n_bits) - 1))


steps_strategy = st.lists(st.one_of(table_steps(), table_steps(), uniform_steps()), max_size=40)


@settings(max_examples=150, deadline=None)
@given(steps_strategy)
def test_round_trip_and_size_bound(steps: list[Step]) -> None:
    _, n_bits, ideal = round_trip(steps)
    # Termination costs at most 3 bits, padding at most 7; rounding 1.4e-9 bits per symbol.
    assert n_bits < ideal + 3 + 7 + 2e-9 * len(steps) + 1e-9


@settings(max_examples=50, deadline=None)
@given(steps_strategy)
def test_n_bits_is_the_length_if_finished_now(steps: list[Step]) -> None:
    enc = ArithmeticEncoder()
    for i, (spec, sym) in enumerate(steps):
        if isinstance(spec, int):
            enc.encode_uniform(sym, spec)
        else:
            enc.encode(spec[sym], spec[sym + 1] - spec[sym], spec[-1])
        n_bits = enc.n_bits
        data = copy.deepcopy(enc).finish()
        assert 8 * len(data) == n_bits
        assert decode(data, [s for s, _ in steps[: i + 1]]) == [s for _, s in steps[: i + 1]]


def random_table_steps(rng: np.random.Generator, n: int, vocab: int, total: int) -> list[Step]:
    """n symbols drawn from random tables of a skewed, model-like shape."""
    steps: list[Step] = []
    for _ in range(n):
        weights = rng.pareto(1.0, vocab) + 1e-12
        counts = np.maximum(1, (weights / weights.sum() * (total - vocab)).astype(np.int64))
        cum = (0, *np.cumsum(counts).tolist())
        steps.append((cum, int(rng.choice(vocab, p=counts / cum[-1]))))
    return steps


@pytest.mark.parametrize("seed", range(5))
def test_size_within_one_percent_plus_two_bits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    total = int(rng.integers(2**20, 2**32))
    steps: list[Step] = [(32, int(rng.integers(0, 2**32)))]  # e.g. a checksum
    steps += random_table_steps(rng, int(rng.integers(1, 300)), int(rng.integers(2, 60)), total)
    _, n_bits, ideal = round_trip(steps)
    assert ideal - 1 <= n_bits <= 1.01 * ideal + 10


def test_round_trip_on_a_152k_vocabulary() -> None:
    rng = np.random.default_rng(7)
    vocab = 151936
    weights = rng.pareto(0.8, vocab)
    counts = (weights / weights.sum() * (2**31 - vocab)).astype(np.int64) + 1
    cum = np.concatenate([[0], np.cumsum(counts)])
    symbols = rng.choice(vocab, size=200, p=counts / cum[-1]).tolist()
    symbols += [0, vocab - 1, int(np.argmin(counts))]  # table edges and the rarest symbol
    _, n_bits, ideal = round_trip([(cum, s) for s in symbols])
    assert abs(n_bits - ideal) <= 0.01 * ideal + 2


def test_pinned_message() -> None:
    """Any change to the coder's arithmetic, termination or padding shows up here."""
    steps: list[Step] = [
        ((0, 1, 4, 10), 1),
        ((0, 3, 2**31), 1),
        ((0, 1, MAX_TOTAL), 0),
        ((0, 1, MAX_TOTAL), 1),
        (16, 0xBEEF),
        ((0, 9, 10), 1),
        ((0, 1, 2, 3), 2),
    ]
    data, n_bits, _ = round_trip(steps)
    assert (data.hex(), n_bits) == ("1999999b9fae64", 56)


def test_empty_message() -> None:
    assert ArithmeticEncoder().finish() == b""
    assert ArithmeticDecoder(b"").finish() == 0
    assert ArithmeticDecoder(b"\x42").finish() == 0  # the byte is the next message's


def test_the_termination_is_explicit_bits() -> None:
    """Nothing is implied by the end of the data: ten symbols at the bottom of their tables
    (320 bits) take 320 zero bits, which leave the whole interval: no termination; a
    message cut short is incomplete."""
    steps: list[Step] = [((0, 1, 2**32), 0)] * 10
    data, n_bits, _ = round_trip(steps)
    assert (data, n_bits) == (bytes(40), 320)
    dec = ArithmeticDecoder(data[:-1])
    for _ in range(10):
        assert dec.decode_target(2**32) == 0
        dec.consume(0, 1, 2**32)
    assert dec.overrun_bits > 0
    with pytest.raises(IncompleteMessage):
        dec.finish()


def test_constriction_needs_more_bits_on_the_same_symbols() -> None:
    """constriction's range coder emits 32-bit words; ours ends within a bit of the ideal."""
    rng = np.random.default_rng(3)
    vocab = 50
    probs = rng.dirichlet(np.full(vocab, 0.3))
    counts = np.maximum(1, np.round(probs * 2**24)).astype(np.int64)
    cum = (0, *np.cumsum(counts).tolist())
    model = constriction.stream.model.Categorical(counts / cum[-1], perfect=False)
    for n in (1, 10, 100, 1000):
        symbols = rng.choice(vocab, size=n, p=counts / cum[-1]).astype(np.int32)
        _, ours, ideal = round_trip([(cum, int(s)) for s in symbols])
        theirs = constriction.stream.queue.RangeEncoder()
        theirs.encode(symbols, model)
        assert ours < ideal + 10
        assert ours < theirs.num_bits() + 8
        if n <= 10:  # short messages: a whole 32-bit word or more of overhead
            assert theirs.num_bits() - ours >= 16


@pytest.mark.parametrize(
    ("low", "freq", "total"),
    [
        (0, 0, 10),  # empty interval
        (-1, 2, 10),
        (5, 6, 10),  # past the end
        (0, 1, 0),
        (0, 1, MAX_TOTAL + 1),
        (0.0, 1, 10),  # floats are not silently truncated
        (0, 1.5, 10),
        ("0", 1, 10),
    ],
)
def test_encode_rejects_bad_intervals(low: object, freq: object, total: object) -> None:
    with pytest.raises(CodecError):
        ArithmeticEncoder().encode(low, freq, total)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "n_bits"), [(0, 0), (0, 33), (4, 2), (-1, 8), (1.0, 8)])
def test_uniform_rejects_bad_arguments(value: object, n_bits: int) -> None:
    with pytest.raises(CodecError):
        ArithmeticEncoder().encode_uniform(value, n_bits)  # type: ignore[arg-type]


@pytest.mark.parametrize("n_bits", [0, 33, 8.0])
def test_decode_uniform_rejects_bad_widths(n_bits: object) -> None:
    with pytest.raises(CodecError):
        ArithmeticDecoder(b"").decode_uniform(n_bits)  # type: ignore[arg-type]


def test_decoder_wants_bytes() -> None:
    with pytest.raises(CodecError):
        ArithmeticDecoder(5)  # type: ignore[arg-type]  # bytes(5) would be five zero bytes


def test_numpy_integers_are_accepted_as_python_ints() -> None:
    """int64 arguments must not overflow inside the coder's wider arithmetic."""
    enc = ArithmeticEncoder()
    enc.encode(np.int64(2**31), np.int64(2**31), np.int64(MAX_TOTAL))
    dec = ArithmeticDecoder(enc.finish())
    assert dec.decode_target(np.int64(MAX_TOTAL)) >= 2**31
    dec.consume(np.int64(2**31), np.int64(2**31), np.int64(MAX_TOTAL))
    dec.finish()


def test_finished_encoder_refuses_more() -> None:
    enc = ArithmeticEncoder()
    enc.encode(1, 1, 3)
    enc.finish()
    with pytest.raises(CodecError):
        enc.encode(1, 1, 3)
    with pytest.raises(CodecError):
        enc.encode_uniform(1, 3)
    with pytest.raises(CodecError):
        enc.finish()


def test_decoder_protocol_misuse() -> None:
    enc = ArithmeticEncoder()
    enc.encode(3, 2, 10)
    data = enc.finish()
    with pytest.raises(CodecError, match="does not follow"):
        ArithmeticDecoder(data).consume(3, 2, 10)  # no decode_target first
    dec = ArithmeticDecoder(data)
    assert dec.decode_target(10) in (3, 4)
    with pytest.raises(CodecError, match="does not follow"):
        dec.consume(3, 2, 11)  # another total
    with pytest.raises(CodecError, match="does not hold"):
        dec.consume(0, 3, 10)  # an interval that does not hold the target
    with pytest.raises(CodecError):
        dec.decode_target(0)
    dec.consume(3, 2, 10)
    with pytest.raises(CodecError, match="does not follow"):
        dec.consume(3, 2, 10)  # one consume per target
    dec.finish()


def test_value_in_no_symbols_interval_is_rejected() -> None:
    # With total 3 the top 2**64 - 3 * (2**64 // 3) values belong to no symbol.
    with pytest.raises(CodecError, match="outside every"):
        ArithmeticDecoder(b"\xff" * 8).decode_target(3)


def outcome(data: bytes, steps: list[Step]) -> tuple[list[int], int] | None:
    """Decoded symbols and the message's length, or None if the decoder raised CodecError."""
    dec = ArithmeticDecoder(data)
    try:
        out = []
        for spec, _ in steps:
            target = dec.decode_target(spec[-1])
            sym = int(np.searchsorted(spec, target, side="right")) - 1
            dec.consume(spec[sym], spec[sym + 1] - spec[sym], spec[-1])
            out.append(sym)
        return out, dec.finish()
    except CodecError:
        return None


@pytest.mark.parametrize("seed", range(3))
def test_altered_messages_never_decode_to_the_original(seed: int) -> None:
    """Truncation and every single bit flip: an error or other symbols.

    finish() accepts only data that start with the canonical message of the decoded symbols,
    so data that differ from the original cannot decode to the original symbols; they may
    decode to other symbols without an error, which the frame's integrity check must catch.
    """
    rng = np.random.default_rng(seed)
    steps = random_table_steps(rng, 30, 20, 2**31)
    data, _, _ = round_trip(steps)
    original = ([sym for _, sym in steps], len(data))
    altered = [data[:-1], data[:-2]]
    altered += [
        data[:i] + bytes([data[i] ^ (1 << b)]) + data[i + 1 :]
        for i in range(len(data))
        for b in range(8)
    ]
    results = [outcome(bad, steps) for bad in altered]
    assert all(r != original for r in results)
    assert any(r is None for r in results) and any(r is not None for r in results)


def test_overrun_bits_and_what_they_cannot_tell() -> None:
    steps: list[Step] = [(32, 0xDEADBEEF), (32, 0x12345678)]
    data, _, _ = round_trip(steps)
    assert data == bytes.fromhex("deadbeef12345678")  # raw bits cost exactly their length

    dec = ArithmeticDecoder(data + b"\x80" * 8)  # the next message: nothing read past the end
    assert [dec.decode_uniform(32), dec.decode_uniform(32)] == [0xDEADBEEF, 0x12345678]
    assert dec.overrun_bits == 0 and dec.finish() == 8

    # Data cut short decode as if zeros followed, here to other symbols; the decoder says
    # that it read past the end, and finish that the message needs more bytes.
    dec = ArithmeticDecoder(data[:6])
    assert [dec.decode_uniform(32), dec.decode_uniform(32)] == [0xDEADBEEF, 0x12340000]
    assert dec.overrun_bits == 128 - 48
    with pytest.raises(IncompleteMessage):
        dec.finish()
