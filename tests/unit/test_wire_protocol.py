"""The link protocol's bytes: pinned layouts, strict parsers (whole, byte by byte, split at
random, with trailing garbage, random bytes), limits."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uplimit.coding.sampling import SamplingParams
from uplimit.errors import ConfigError, InvalidRequest
from uplimit.wire.limits import MAX_EXTRA_BYTES, MAX_PROMPT_TOKENS, MAX_STREAM_TOKENS, MAX_TOP_K
from uplimit.wire.protocol import (
    DOWNLINK_PREAMBLE,
    MAX_MODEL_BYTES,
    Accept,
    ByteRate,
    Cancel,
    DownlinkLimits,
    DownlinkParser,
    End,
    EndReason,
    Frame,
    FrameBytes,
    Hello,
    LedgerReport,
    ModelData,
    ModelOffer,
    OpenStream,
    ProtocolError,
    Refuse,
    Resend,
    Resync,
    Shutdown,
    Switch,
    UplinkParser,
    accepted_downlink,
    encode_downlink,
    encode_uplink,
)
from uplimit.wire.streams import StreamSpec

SPEC = StreamSpec(3, (1, 2, 300), SamplingParams(0.5, 0.9, 5), 0x0102030405060708, 50)
FIELDS = 3  # keys in the HELLO the uplink parsers answer
HELLO = encode_downlink(Hello.of({"a": "1"}))
# An accept and the ledger report that must follow it (id 0..0, total 0, not confined).
ACCEPTED = b"\x21abcd\x23" + bytes(16) + b"\x00\x00"

# --- pinned layouts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "hex_bytes"),
    [
        (
            Hello.of({"weak.sha256": "ab", "codec.version": "1"}),  # sorted on the wire
            "0100000020" "02" "0d" + b"codec.version".hex() + "0131" "0b" + b"weak.sha256".hex()
            + "02" + b"ab".hex(),
        ),
        (
            OpenStream(SPEC, b"{}"),
            "0200000033" "03" "0102030405060708" "32" "3fe0000000000000" "3feccccccccccccd" "05"
            "0000000000000000" "0000000000000000" "03" "01" "02" "ac02" "02" "7b7d",
        ),
        (Cancel(5), "0300000001" "05"),
        (Resend(300), "0400000002" "ac02"),
        (Shutdown(), "0500000000"),
    ],
)  # fmt: skip
def test_downlink_bytes_are_pinned(msg, hex_bytes):
    assert DOWNLINK_PREAMBLE == b"UPLD\x02"
    assert encode_downlink(msg).hex() == hex_bytes
    first = b"" if isinstance(msg, Hello) else HELLO  # HELLO comes first
    parsed = DownlinkParser().feed(DOWNLINK_PREAMBLE + first + bytes.fromhex(hex_bytes))
    assert parsed[-1] == msg


@pytest.mark.parametrize(
    ("msg", "hex_bytes"),
    [
        (Accept(b"\xde\xad\xbe\xef"), "21deadbeef"),
        (LedgerReport(bytes(range(16)), 300, True), "23" + bytes(range(16)).hex() + "ac02" "01"),
        (Refuse(((0, "a"), (3, "xy"))), "22" "02" "0001" + "61" + "0302" + "7879"),
        (Frame(b"\xab"), "ab"),  # frames delimit themselves: no prefix
        (Frame(bytes(200)), "00" * 200),
        # RESYNC, END's kind escape, the reason in 3 bits
        (End(EndReason.LIFETIME), "a7c3e15f2b9d0486" "ffff20"),
        (End(EndReason.SHUTDOWN), "a7c3e15f2b9d0486" "ffff80"),
        (Resync(), "a7c3e15f2b9d0486"),
    ],
)  # fmt: skip
def test_uplink_bytes_are_pinned(msg, hex_bytes):
    assert encode_uplink(msg).hex() == hex_bytes


def test_every_uplink_message_is_as_small_as_the_layout_allows():
    # An accept is 5 bytes once per connection; a frame pays nothing besides itself; END is 11
    # (its RESYNC marker and 3).
    assert len(encode_uplink(Accept(bytes(4)))) == 5
    # The ledger report follows it once: 16 id bytes, the total (<= 9 bytes up to 2**63), flags.
    assert len(encode_uplink(LedgerReport(bytes(16), 10**6, False))) == 1 + 16 + 3 + 1
    assert [len(encode_uplink(Frame(bytes(n)))) - n for n in (1, 127, 128, 16384)] == [0] * 4
    assert len(encode_uplink(End(EndReason.LIFETIME))) == 11


# --- strategies -------------------------------------------------------------------------------

keys = st.text("abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=20)
values = st.text(max_size=40).filter(str.isprintable)
hellos = st.dictionaries(keys, values, max_size=6).map(Hello.of)
params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 2.0]),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
    top_k=st.integers(0, 100),
)
specs = st.builds(
    StreamSpec,
    stream_id=st.integers(0, 2**63 - 1),
    prompt=st.lists(st.integers(0, 151_935), min_size=1, max_size=30).map(tuple),
    params=params,
    seed=st.integers(0, 2**64 - 1),
    max_tokens=st.integers(1, 131_072),
)
middles = st.one_of(
    st.builds(OpenStream, specs, st.binary(max_size=40)),
    st.builds(Cancel, st.integers(0, 2**63 - 1)),
    st.builds(Resend, st.integers(0, 2**32 - 1)),
)
transfers = st.tuples(  # a rollout: OFFER, the file in DATA chunks, SWITCH
    st.binary(min_size=32, max_size=32),
    st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=4),
    st.binary(max_size=30),
    st.binary(min_size=32, max_size=32),
).map(
    lambda t: [
        ModelOffer(t[0], sum(map(len, t[1])), t[2]),
        *map(ModelData, t[1]),
        Switch(t[3]),
    ]
)
downlinks = st.tuples(
    hellos, st.lists(st.one_of(middles.map(lambda m: [m]), transfers), max_size=6), st.booleans()
).map(lambda t: [t[0], *[m for block in t[1] for m in block], *([Shutdown()] if t[2] else [])])
verdicts = st.one_of(
    st.builds(Accept, st.binary(min_size=4, max_size=4)),
    st.lists(st.integers(0, FIELDS), min_size=1, max_size=FIELDS + 1, unique=True).flatmap(
        lambda idx: st.lists(
            st.text(max_size=20).filter(str.isprintable), min_size=len(idx), max_size=len(idx)
        ).map(lambda vals: Refuse(tuple(zip(sorted(idx), vals, strict=True))))
    ),
)
frames = st.builds(Frame, st.binary(min_size=1, max_size=300))
ends = st.builds(End, st.sampled_from(list(EndReason)))
reports = st.builds(LedgerReport, st.binary(min_size=16, max_size=16),
                    st.integers(0, (1 << 63) - 1), st.booleans())  # fmt: skip
uplinks = st.one_of(
    st.tuples(st.builds(Accept, st.binary(min_size=4, max_size=4)), reports,
              st.lists(frames, max_size=8), st.one_of(st.none(), ends),
              ).map(lambda t: [t[0], t[1], *t[2], *([t[3]] if t[3] else [])]),
    verdicts.map(lambda v: [v]),
)  # fmt: skip


def downlink_bytes(msgs) -> bytes:
    return DOWNLINK_PREAMBLE + b"".join(map(encode_downlink, msgs))


def uplink_bytes(msgs) -> bytes:
    return b"".join(m.data if isinstance(m, FrameBytes) else encode_uplink(m) for m in msgs)


def handed_on(msgs) -> list:
    """What the uplink parser returns for `msgs`: the handshake's messages, then everything
    after it as frame-stream bytes (`FrameBytes`, however the reads split them)."""
    head = [m for m in msgs if isinstance(m, Accept | LedgerReport | Refuse)]
    rest = uplink_bytes([m for m in msgs if not isinstance(m, Accept | LedgerReport | Refuse)])
    return head + ([FrameBytes(rest)] if rest else [])


def joined(parsed) -> list:
    out = [m for m in parsed if not isinstance(m, FrameBytes)]
    rest = b"".join(m.data for m in parsed if isinstance(m, FrameBytes))
    return out + ([FrameBytes(rest)] if rest else [])


def feed_in(parser, data: bytes, cuts: list[int]) -> list:
    """Feed `data` split at `cuts`, then signal the end of the stream."""
    out, start = [], 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        out += parser.feed(data[start:cut])
        start = max(start, cut)
    parser.eof()
    return out


# --- round trips ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(msgs=downlinks, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_downlink_round_trips_whole_split_and_byte_by_byte(msgs, cuts):
    data = downlink_bytes(msgs)
    assert DownlinkParser().feed(data) == msgs
    assert feed_in(DownlinkParser(), data, cuts) == msgs
    assert feed_in(DownlinkParser(), data, list(range(len(data)))) == msgs


@settings(max_examples=150, deadline=None)
@given(msgs=uplinks, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_uplink_round_trips_whole_split_and_byte_by_byte(msgs, cuts):
    data, want = uplink_bytes(msgs), handed_on(msgs)
    assert UplinkParser(FIELDS).feed(data) == want
    assert joined(feed_in(UplinkParser(FIELDS), data, cuts)) == want
    assert joined(feed_in(UplinkParser(FIELDS), data, list(range(len(data))))) == want


@settings(max_examples=100, deadline=None)
@given(msgs=uplinks, cut=st.integers(1, 10_000))
def test_a_stream_cut_inside_a_message_is_an_error_at_eof(msgs, cut):
    data = uplink_bytes(msgs)
    boundaries = {0}
    for m in msgs:
        if isinstance(m, Accept | LedgerReport | Refuse):
            boundaries.add(max(boundaries) + len(encode_uplink(m)))
    if any(isinstance(m, LedgerReport) for m in msgs):  # frames are the receiver's to delimit
        boundaries |= set(range(max(boundaries), len(data) + 1))
    cut %= len(data) + 1
    parser = UplinkParser(FIELDS)
    parser.feed(data[:cut])
    if cut in boundaries:
        parser.eof()
    else:
        with pytest.raises(ProtocolError, match="inside a message"):
            parser.eof()


# --- anything else is an error, and the parser stays failed -----------------------------------


@settings(max_examples=100, deadline=None)
@given(
    msgs=downlinks.map(lambda m: m if isinstance(m[-1], Shutdown) else [*m, Shutdown()]),
    garbage=st.binary(min_size=1, max_size=20),
)
def test_bytes_after_shutdown_are_refused(msgs, garbage):
    parser = DownlinkParser()
    with pytest.raises(ProtocolError, match="after the last message"):
        parser.feed(downlink_bytes(msgs) + garbage)
    with pytest.raises(ProtocolError, match="ERROR"):
        parser.feed(b"")
    with pytest.raises(ProtocolError, match="ERROR"):
        parser.eof()


@settings(max_examples=100, deadline=None)
@given(msgs=uplinks, garbage=st.binary(min_size=1, max_size=20))
def test_bytes_after_a_refusal_are_refused(msgs, garbage):
    """(After END: the receiver's test, where frames are delimited.)"""
    if not isinstance(msgs[-1], Refuse):
        return
    parser = UplinkParser(FIELDS)
    with pytest.raises(ProtocolError, match="after the last message"):
        parser.feed(uplink_bytes(msgs) + garbage)
    with pytest.raises(ProtocolError, match="ERROR"):
        parser.feed(uplink_bytes([Frame(b"ok")]))


def _canonical_prefix(parse, encode, data: bytes) -> None:
    """Whatever a parser accepts from arbitrary bytes is the canonical encoding of what it
    returned: no two byte strings mean the same messages (no slack for a covert channel)."""
    parser = parse()
    try:
        msgs = parser.feed(data)
    except ProtocolError:
        return
    assert encode(msgs) == data[: len(data) - parser.buffered]


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=64))
def test_random_uplink_bytes_parse_canonically_or_raise_protocol_error(data):
    _canonical_prefix(lambda: UplinkParser(FIELDS), uplink_bytes, data)
    # The same after a valid verdict and ledger report, where bytes are handed on.
    _canonical_prefix(lambda: UplinkParser(FIELDS), uplink_bytes, ACCEPTED + data)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=80), hello=hellos)
def test_random_downlink_bytes_parse_canonically_or_raise_protocol_error(data, hello):
    _canonical_prefix(DownlinkParser, downlink_bytes, DOWNLINK_PREAMBLE + data)
    _canonical_prefix(DownlinkParser, downlink_bytes, downlink_bytes([hello]) + data)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x23", "not protocol 2"),  # unknown verdict
        (b"\x11abcd", "not protocol 2"),  # accept of protocol 1
        (b"\x21abcd\x01\xab", "expected the ledger report after the accept"),
        (b"\x21abcd\x23" + bytes(16) + b"\x00\x02", "only bit 0"),
        (b"\x21abcd\x23" + bytes(16) + b"\x80\x00", "not minimally encoded"),
        (b"\x22\x00", "names 0 fields"),
        (b"\x22\x06", "names 6 fields"),
        (b"\x22\x02\x01\x00\x01\x00", "out of order"),
        (b"\x22\x01\x04\x00", "out of order or range"),
        (b"\x22\x01\x00\x01\xff", "not UTF-8"),
        (b"\x22\x01\x00\x01\n", "control characters"),
    ],
)
def test_malformed_uplink_input_is_refused(data, error):
    with pytest.raises(ProtocolError, match=error):
        UplinkParser(FIELDS).feed(data)


def _message(kind: int, body: bytes) -> bytes:
    return struct.pack(">BI", kind, len(body)) + body


def _open_body(**change) -> bytes:
    f = {
        "id": b"\x03", "seed": bytes(8), "max_tokens": b"\x05", "t": 0.5, "p": 1.0,
        "k": b"\x00", "tie": 0.0, "tilt": 0.0, "prompt": b"\x01\x07", "extra": b"\x00",
    }  # fmt: skip
    f.update(change)
    return (
        f["id"] + f["seed"] + f["max_tokens"] + struct.pack(">dd", f["t"], f["p"]) + f["k"]
        + struct.pack(">dd", f["tie"], f["tilt"]) + f["prompt"] + f["extra"]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (_message(2, _open_body()), "HELLO must be the first"),
        (HELLO + HELLO, "HELLO must be the first"),
        (HELLO + _message(9, b""), "unknown downlink message type 9"),
        (HELLO + _message(3, b"\x05\x00"), "1 bytes left over"),
        (HELLO + _message(3, b""), "truncated"),
        (HELLO + _message(4, b"\x80\x80\x80\x80\x10"), "exceeds"),  # frame number >= 2**32
        (_message(1, b"\x02\x01b\x010\x01a\x010"), "not sorted"),
        (_message(1, b"\x01\x01A\x01\x07"), "control characters"),
        (_message(1, b"\x01\x03a b\x00"), "must be 1.. of"),
        (_message(1, b"\x01\x01a\x02\xc3\x28"), "not UTF-8"),
        (HELLO + _message(2, _open_body(t=math.nan)), "finite"),
        (HELLO + _message(2, _open_body(t=2.5)), "temperature"),
        (HELLO + _message(2, _open_body(tie=math.inf)), "finite"),
        (HELLO + _message(2, _open_body(tie=-0.0)), "-0.0 included"),
        (HELLO + _message(2, _open_body(tilt=-0.0)), "-0.0 included"),
        (HELLO + _message(2, _open_body(tie=10.5, t=0.0)), "tie_nats must be in"),
        (HELLO + _message(2, _open_body(tie=1.0)), "tie_nats applies only at temperature 0"),
        (HELLO + _message(2, _open_body(tilt=1.5)), "tilt must be in"),
        (HELLO + _message(2, _open_body(tilt=0.5, t=0.0)), "tilt applies only at temperature"),
        (HELLO + _message(2, _open_body(max_tokens=b"\x00")), "max_tokens"),
        (HELLO + _message(2, _open_body(prompt=b"\x00")), "non-empty prompt"),
        (HELLO + _message(2, _open_body(prompt=b"\x01\xc0\x05")), "prompt token exceeds 703"),
        (HELLO + _message(2, _open_body(extra=b"\x05ab")), "truncated"),
    ],
)
def test_malformed_downlink_input_is_refused(data, error):
    parser = DownlinkParser(n_vocab=704)
    with pytest.raises(ProtocolError, match=error):
        parser.feed(DOWNLINK_PREAMBLE + data)
    with pytest.raises(ProtocolError, match="ERROR"):
        parser.feed(b"")


def test_a_rollout_is_pinned_and_parsed_in_order():
    sha, fp = bytes(range(32)), bytes(range(32, 64))
    msgs = [ModelOffer(sha, 3, b"{}"), ModelData(b"ab"), ModelData(b"c"), Switch(fp)]
    wire = [encode_downlink(m).hex() for m in msgs]
    assert wire == [
        "0600000024" + sha.hex() + "03" "02" "7b7d",
        "0700000002" "6162",
        "0700000001" "63",
        "0800000020" + fp.hex(),
    ]  # fmt: skip
    parser = DownlinkParser()
    assert parser.feed(DOWNLINK_PREAMBLE + HELLO + b"".join(map(encode_downlink, msgs)))[1:] == msgs
    assert parser.model_bytes_left is None  # a new transfer may start


_SHA = bytes(32)
_OFFER3 = _message(6, _SHA + b"\x03\x00")  # a 3-byte model, no calibration


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (_message(7, b"ab"), "beyond the offered model's size"),  # no offer
        (_OFFER3 + _message(7, b"abcd"), "beyond the offered model's size"),
        (_OFFER3 + _message(7, b"ab") + _message(8, _SHA), "before the offered model"),
        (_message(8, _SHA), "before the offered model"),  # no transfer at all
        (_OFFER3 + _OFFER3, "another model transfer"),
        (_OFFER3 + _message(7, b""), "MODEL_DATA is empty"),
        (_message(6, _SHA + b"\x00\x00"), "an empty model"),
        (_message(6, bytes(31)), "truncated"),
        (_message(6, _SHA + b"\x01\x05ab"), "truncated"),  # calibration shorter than said
        (_message(6, _SHA + b"\x81\x80\x80\x80\x80\x02\x00"), "exceeds"),  # 2**36 + 1
        (_message(6, _SHA + b"\x01\x80\x80\x08"), "exceeds 65536"),  # calibration > 64 KiB
        (_message(8, bytes(31)), "truncated"),
        (_OFFER3 + _message(7, b"abc") + _message(8, bytes(33)), "1 bytes left over"),
    ],
)
def test_a_malformed_or_out_of_order_rollout_is_refused(data, error):
    parser = DownlinkParser()
    with pytest.raises(ProtocolError, match=error):
        parser.feed(DOWNLINK_PREAMBLE + HELLO + data)
    assert MAX_MODEL_BYTES == 1 << 36


@pytest.mark.parametrize("preamble", [b"UPLD\x01", b"HTTP/1.1", b"uPLD\x02"])
def test_a_downlink_without_the_protocol_1_preamble_is_refused_at_its_first_byte(preamble):
    parser = DownlinkParser()
    with pytest.raises(ProtocolError, match="not protocol 2"):
        for i in range(len(preamble)):
            parser.feed(preamble[i : i + 1])
    assert i == next(i for i in range(5) if preamble[i] != DOWNLINK_PREAMBLE[i])


def test_the_downlink_message_limit_is_checked_from_the_header():
    parser = DownlinkParser(DownlinkLimits(max_message_bytes=100, burst_bytes=100))
    parser.feed(DOWNLINK_PREAMBLE + HELLO)
    with pytest.raises(ProtocolError, match="101 bytes; the limit is 100"):
        parser.feed(struct.pack(">BI", 3, 101))


def test_encoders_refuse_what_the_parsers_would():
    with pytest.raises(ConfigError):
        encode_uplink(Frame(b""))
    with pytest.raises(ConfigError):
        encode_uplink(Accept(b"abc"))
    with pytest.raises(ConfigError):
        encode_uplink(LedgerReport(bytes(15), 0, False))
    with pytest.raises(ConfigError):
        encode_uplink(Refuse(((2, "x"), (1, "y"))))
    with pytest.raises(ConfigError):
        encode_uplink(Refuse(((0, "x" * 256),)))
    with pytest.raises(ConfigError):
        encode_downlink(Hello((("b", "1"), ("a", "2"))))
    with pytest.raises(ConfigError):
        encode_downlink(Hello((("a b", "1"),)))


def test_byte_rate_is_a_token_bucket():
    rate = ByteRate(100.0, 300, now=0.0)
    assert rate.take(300, 0.0)  # the burst
    assert not rate.take(1, 0.0)
    assert rate.take(50, 0.5)  # refilled at 100 bytes/s
    assert not rate.take(51, 0.5)
    assert rate.take(300, 100.0) and not rate.take(1, 100.0)  # refills up to the burst only
    assert not rate.take(1, 99.0)  # a clock stepped back refills nothing


# --- what the outer sends is what the inner accepts --------------------------------------------


def test_accepted_downlink_is_the_encoding_the_inner_parses():
    msg = OpenStream(SPEC, b'{"request_id": "x"}')
    assert accepted_downlink(msg, DownlinkLimits(), 1000) == encode_downlink(msg)


def test_a_stream_past_the_limits_table_cannot_be_made():
    """The parser's limits are `wire.limits`'s: a spec past them is the client's error (a
    400 naming the parameter) before any message exists."""
    with pytest.raises(InvalidRequest, match="top_k") as e:
        StreamSpec(3, (1, 2), SamplingParams(0.5, 1.0, MAX_TOP_K + 1), 1, 50)
    assert e.value.param == "top_k"
    with pytest.raises(InvalidRequest) as e:
        StreamSpec(3, (1, 2), SamplingParams(), 1, MAX_STREAM_TOKENS + 1)
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequest) as e:
        StreamSpec(3, (1,) * (MAX_PROMPT_TOKENS + 1), SamplingParams(), 1, 50)
    assert e.value.param == "prompt"
    # At every limit at once (the longest token ids too), one downlink message still holds it
    # and the inner's parser reads it back.
    spec = StreamSpec(3, (2**32 - 1,) * MAX_PROMPT_TOKENS, SamplingParams(1.0, 1.0, MAX_TOP_K),
                      1, MAX_STREAM_TOKENS)  # fmt: skip
    accepted_downlink(OpenStream(spec, b"x" * MAX_EXTRA_BYTES), DownlinkLimits(), None)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (StreamSpec(3, (1, 1000), SamplingParams(), 1, 50), "prompt token"),
    ],
)
def test_what_the_inner_would_refuse_is_refused_before_sending(spec, reason):
    with pytest.raises(ProtocolError, match=reason):
        accepted_downlink(OpenStream(spec), DownlinkLimits(), 1000)


@settings(max_examples=300, deadline=None)
@given(
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    top_p=st.floats(allow_nan=True, allow_infinity=True),
    top_k=st.integers(min_value=0, max_value=2**70),
    max_tokens=st.integers(min_value=0, max_value=2**40),
    seed=st.integers(min_value=0, max_value=2**64 - 1),
    prompt=st.lists(st.integers(min_value=0, max_value=2**25), min_size=0, max_size=40),
    extra=st.binary(max_size=64),
    knobs=st.tuples(
        st.floats(-1, 12) | st.sampled_from([0.0, -0.0]),
        st.floats(-0.5, 1.5) | st.sampled_from([0.0, -0.0]),
    ),
)
def test_any_stream_is_refused_or_parsed_by_the_inner(
    temperature, top_p, top_k, max_tokens, seed, prompt, extra, knobs
):
    """Whatever a request carries: either it is refused before it is sent (a client's error),
    or the inner's parser reads exactly it. Nothing in between would end the link."""
    try:
        params = SamplingParams(temperature, top_p, top_k, *knobs)
        spec = StreamSpec(7, tuple(prompt), params, seed, max_tokens)
        data = accepted_downlink(OpenStream(spec, extra), DownlinkLimits(), 151_936)
    except (InvalidRequest, ConfigError, ProtocolError):
        return
    parser = DownlinkParser(n_vocab=151_936)
    parser.feed(DOWNLINK_PREAMBLE + encode_downlink(Hello(())))
    assert parser.feed(data) == [OpenStream(spec, extra)]
