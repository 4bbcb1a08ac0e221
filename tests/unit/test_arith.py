"""The arithmetic coder: exact round trips, size bounds, pinned bytes, strict decoding."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import constriction
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uplimit.coding.arith import MAX_TOTAL, ArithmeticDecoder, ArithmeticEncoder
from uplimit.errors import CodecError

# A step is either (cumulative counts of a table, symbol) or (n_bits, value) for a uniform
# symbol. The decoder gets the tables and bit widths, never the symbols.
Step = tuple[Sequence[int], int] | tuple[int, int]


def encode(steps: list[Step]) -> tuple[bytes, int, float]:
    """(message, n_bits before padding, ideal cost in bits)."""
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


def decode(data: bytes, specs: list[Sequence[int] | int]) -> list[int]:
    """Decode one symbol per spec, then check that the message was canonical."""
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
    dec.finish()
    assert dec.overrun_bits >= 56  # documented for every well-formed message
    return out


def round_trip(steps: list[Step]) -> tuple[bytes, int, float]:
    data, n_bits, ideal = encode(steps)
    assert len(data) == (n_bits + 7) // 8
    assert not data or data[-1] != 0  # no trailing zero byte: padding is only the last bits
    assert decode(data, [spec for spec, _ in steps]) == [sym for _, sym in steps]
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
    # Termination costs at most one bit; rounding at most 1.4e-9 bits per symbol.
    assert n_bits < ideal + 1 + 2e-9 * len(steps) + 1e-9


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
        assert len(data) == (n_bits + 7) // 8
        if data:  # the last 1 bit sits exactly at position n_bits - 1
            assert 8 * len(data) - ((data[-1] & -data[-1]).bit_length() - 1) == n_bits
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
    # Below the ideal is possible (trailing zero bits are free), but only by a few bits.
    assert abs(n_bits - ideal) <= 0.01 * ideal + 2


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
    assert (data.hex(), n_bits) == ("1999999b9fae64", 54)


def test_empty_message() -> None:
    assert ArithmeticEncoder().finish() == b""
    ArithmeticDecoder(b"").finish()


def test_symbols_at_the_bottom_of_their_tables_are_implied_by_zero_padding() -> None:
    """The message is not self-delimiting: the symbol count comes from elsewhere."""
    steps: list[Step] = [((0, 1, 2**32), 0)] * 10  # ideal cost 320 bits
    data, n_bits, _ = round_trip(steps)
    assert (data, n_bits) == (b"", 0)
    # Only bits after the last 1 are implied: here the 1 that spells low = 1/2.
    data, n_bits, _ = round_trip([((0, 1, 2), 1), *steps])
    assert (data, n_bits) == (b"\x80", 1)


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
        assert ours < ideal + 1
        assert ours < theirs.num_bits()
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


def outcome(data: bytes, steps: list[Step]) -> list[int] | None:
    """Decoded symbols, or None if the decoder raised CodecError."""
    try:
        return decode(data, [spec for spec, _ in steps])
    except CodecError:
        return None


@pytest.mark.parametrize("seed", range(3))
def test_altered_messages_never_decode_to_the_original(seed: int) -> None:
    """Truncation, trailing bytes and every single bit flip: an error or other symbols.

    finish() accepts only the canonical message of the decoded symbols, so data that differs
    from the original cannot decode to the original symbols; it may decode to other symbols
    without an error, which the frame's integrity check must catch.
    """
    rng = np.random.default_rng(seed)
    steps = random_table_steps(rng, 30, 20, 2**31)
    data, _, _ = round_trip(steps)
    original = [sym for _, sym in steps]
    altered = [data[:-1], data[:-2], data + b"\x00", data + b"\x01", data + b"\xff"]
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

    dec = ArithmeticDecoder(data + b"\x80" * 4)  # trailing bytes: overrun drops below 56
    assert [dec.decode_uniform(32), dec.decode_uniform(32)] == [0xDEADBEEF, 0x12345678]
    assert dec.bits_read == 64 + 64 and dec.overrun_bits == 128 - 96
    with pytest.raises(CodecError):
        dec.finish()

    # A truncated message is another message: here the canonical one of other symbols,
    # so only the frame's integrity check can tell.
    dec = ArithmeticDecoder(data[:6])
    assert [dec.decode_uniform(32), dec.decode_uniform(32)] == [0xDEADBEEF, 0x12340000]
    assert dec.overrun_bits == 128 - 48
    dec.finish()
