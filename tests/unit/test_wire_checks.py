"""The verifier connection's bytes (wire/checks.py): a pinned layout, round trips in any
chunking, and a strict parser: malformed input, random bytes and mutations of valid messages
give ProtocolError and nothing else, and the parser stays failed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uplimit.coding.sampling import SamplingParams
from uplimit.errors import ConfigError, ProtocolError
from uplimit.wire.checks import (
    CHECK_PREAMBLE,
    MAX_CHECK_BYTES,
    CheckJob,
    CheckParser,
    encode_check,
)
from uplimit.wire.protocol import OpenStream, encode_downlink
from uplimit.wire.streams import StreamSpec

SPEC = StreamSpec(3, (1, 2, 300), SamplingParams(0.5, 0.9, 5, tilt=0.25), 0x0102030405060708, 50)
N_VOCAB = 704


def test_the_layout_is_pinned_and_shares_open_streams_spec_fields():
    data = encode_check(CheckJob(SPEC, (7, 300), best_of=2))
    spec_fields = "030102030405060708323fe00000000000003feccccccccccccd05"
    spec_fields += "00000000000000003fd0000000000000030102ac02"  # tie_nats 0, tilt 0.25
    assert data.hex() == "0100000035" + spec_fields + "020207ac02"
    # OPEN_STREAM's body is the same spec fields, then its extra: one layout, one codec.
    assert encode_downlink(OpenStream(SPEC)).hex() == "0200000031" + spec_fields + "00"
    assert CHECK_PREAMBLE == b"UPLV\x02"


# --- strategies -------------------------------------------------------------------------------

params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 2.0]),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
    top_k=st.integers(0, 100),
)
token_ids = st.integers(0, N_VOCAB - 1)


@st.composite
def jobs(draw) -> CheckJob:
    max_tokens = draw(st.integers(1, 40))
    spec = StreamSpec(
        draw(st.integers(0, 2**63 - 1)),
        tuple(draw(st.lists(token_ids, min_size=1, max_size=20))),
        draw(params),
        draw(st.integers(0, 2**64 - 1)),
        max_tokens,
    )
    tokens = draw(st.lists(token_ids, min_size=1, max_size=max_tokens))
    return CheckJob(spec, tuple(tokens), draw(st.integers(1, 16)))


def stream_bytes(msgs: list[CheckJob]) -> bytes:
    return CHECK_PREAMBLE + b"".join(map(encode_check, msgs))


def feed_in(parser: CheckParser, data: bytes, cuts: list[int]) -> list[CheckJob]:
    out, start = [], 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        out += parser.feed(data[start:cut])
        start = max(start, cut)
    parser.eof()
    return out


# --- round trips ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(msgs=st.lists(jobs(), max_size=5), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_jobs_round_trip_whole_split_and_byte_by_byte(msgs, cuts):
    data = stream_bytes(msgs)
    assert CheckParser(n_vocab=N_VOCAB).feed(data) == msgs
    assert feed_in(CheckParser(n_vocab=N_VOCAB), data, cuts) == msgs
    assert feed_in(CheckParser(), data, list(range(len(data)))) == msgs


@settings(max_examples=100, deadline=None)
@given(msgs=st.lists(jobs(), min_size=1, max_size=3), cut=st.integers(1, 10_000))
def test_a_connection_cut_inside_a_message_is_an_error_at_eof(msgs, cut):
    data = stream_bytes(msgs)
    boundaries, at = {len(CHECK_PREAMBLE)}, len(CHECK_PREAMBLE)
    for m in msgs:
        at += len(encode_check(m))
        boundaries.add(at)
    cut = 1 + cut % len(data)
    parser = CheckParser()
    parser.feed(data[:cut])
    if cut in boundaries:
        parser.eof()
    else:
        with pytest.raises(ProtocolError, match="inside a message"):
            parser.eof()


# --- anything else is a ProtocolError, and only that --------------------------------------------


def _only_protocol_errors(data: bytes, chunk: int) -> None:
    """Whatever the parser accepts is the canonical encoding of what it returned; anything
    else raises ProtocolError, after which the parser refuses everything."""
    parser = CheckParser(n_vocab=N_VOCAB)
    got: list[CheckJob] = []
    try:
        for i in range(0, len(data), chunk):
            got += parser.feed(data[i : i + chunk])
    except ProtocolError:
        with pytest.raises(ProtocolError, match="ERROR"):
            parser.feed(stream_bytes([]))
        return
    used = len(data) - parser.buffered
    assert (CHECK_PREAMBLE if used else b"") + b"".join(map(encode_check, got)) == data[:used]


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=80), chunk=st.integers(1, 16))
def test_random_bytes_parse_canonically_or_raise_protocol_error(data, chunk):
    _only_protocol_errors(data, chunk)
    _only_protocol_errors(CHECK_PREAMBLE + data, chunk)


@settings(max_examples=400, deadline=None)
@given(
    msgs=st.lists(jobs(), min_size=1, max_size=3),
    edits=st.lists(
        st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10**6),
                  st.integers(0, 255)),
        min_size=1, max_size=4,
    ),
    chunk=st.integers(1, 64),
)  # fmt: skip
def test_mutated_messages_parse_canonically_or_raise_protocol_error(msgs, edits, chunk):
    data = bytearray(stream_bytes(msgs))
    for op, at, byte in edits:
        at %= len(data) + (op == "insert")
        if op == "flip":
            data[at] ^= byte or 1
        elif op == "insert":
            data.insert(at, byte)
        elif len(data) > 1:
            del data[at]
    _only_protocol_errors(bytes(data), chunk)


def _message(body: bytes, kind: int = 1) -> bytes:
    return struct.pack(">BI", kind, len(body)) + body


def _body(**change: bytes | float) -> bytes:
    f: dict = {
        "id": b"\x03", "seed": bytes(8), "max_tokens": b"\x05", "t": 0.5, "p": 1.0,
        "k": b"\x00", "tie": 0.0, "tilt": 0.0, "prompt": b"\x01\x07", "best_of": b"\x01",
        "tokens": b"\x02\x08\x09",
    }  # fmt: skip
    f.update(change)
    return (
        f["id"] + f["seed"] + f["max_tokens"] + struct.pack(">dd", f["t"], f["p"]) + f["k"]
        + struct.pack(">dd", f["tie"], f["tilt"]) + f["prompt"] + f["best_of"] + f["tokens"]
    )  # fmt: skip


def test_the_reference_body_is_valid():
    [job] = CheckParser(n_vocab=N_VOCAB).feed(CHECK_PREAMBLE + _message(_body()))
    assert (job.spec.prompt, job.tokens, job.best_of) == ((7,), (8, 9), 1)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"UPLD\x02", "not version 2"),  # the downlink's preamble
        (b"UPLV\x01", "not version 2"),
        (_message(_body(), kind=2), "unknown verifier message type 2"),
        (b"\x00", "unknown verifier message type 0"),
        (_message(_body() + b"\x00"), "1 bytes left over"),
        (_message(_body(tokens=b"\x02\x08")), "truncated"),
        (_message(b""), "truncated"),
        (_message(_body(tokens=b"\x00")), "1..max_tokens tokens, got 0"),
        (_message(_body(tokens=b"\x06" + bytes(6))), "1..max_tokens tokens, got 6"),
        (_message(_body(tokens=b"\x01\xc0\x05")), "token exceeds 703"),
        (_message(_body(tokens=b"\x01\x81\x00")), "not minimally encoded"),
        (_message(_body(best_of=b"\x00")), "best_of must be in 1..16"),
        (_message(_body(best_of=b"\x11")), "best_of exceeds 16"),
        (_message(_body(prompt=b"\x00")), "non-empty prompt"),
        (_message(_body(prompt=b"\x01\xc0\x05")), "prompt token exceeds 703"),
        (_message(_body(t=float("nan"))), "CHECK: sampling parameters must be finite"),
        (_message(_body(max_tokens=b"\x00")), "max_tokens"),
        (struct.pack(">BI", 1, MAX_CHECK_BYTES + 1), "limit is 1,048,576"),
    ],
)
def test_malformed_input_is_refused(data, error):
    parser = CheckParser(n_vocab=N_VOCAB)
    if not data.startswith(b"UPL"):
        data = CHECK_PREAMBLE + data
    with pytest.raises(ProtocolError, match=error):
        parser.feed(data)
    with pytest.raises(ProtocolError, match="ERROR"):
        parser.feed(b"")
    with pytest.raises(ProtocolError, match="ERROR"):
        parser.eof()


def test_limits_are_checked_from_the_header_and_the_first_byte():
    parser = CheckParser(max_message_bytes=100)
    parser.feed(CHECK_PREAMBLE)
    with pytest.raises(ProtocolError, match="101 bytes; the limit is 100"):
        parser.feed(struct.pack(">BI", 1, 101))  # no body byte needed to refuse it
    with pytest.raises(ProtocolError, match="not version 2"):
        CheckParser().feed(b"X")  # refused at the first wrong byte
    with pytest.raises(ProtocolError, match="type 9"):
        CheckParser().feed(CHECK_PREAMBLE + b"\x09")


def test_the_encoder_refuses_what_the_parser_would():
    with pytest.raises(ConfigError, match="max_tokens tokens, got 0"):
        CheckJob(SPEC, ())
    with pytest.raises(ConfigError, match="max_tokens tokens, got 51"):
        CheckJob(SPEC, (1,) * 51)
    with pytest.raises(ConfigError, match="best_of"):
        CheckJob(SPEC, (1,), best_of=17)
    # At the stream limits (wire.limits) with 5-byte token ids: prompt and tokens, 1.3 MB.
    long = StreamSpec(1, (2**32 - 1,) * 131_072, SamplingParams(), 0, 131_072)
    with pytest.raises(ConfigError, match="over 1,048,576"):
        encode_check(CheckJob(long, (2**32 - 1,) * 131_072))
