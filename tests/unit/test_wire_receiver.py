"""The outer's uplink core, sans-IO, with the real frame codec on the tiny weak model: only
frames that pass their check are delivered; every problem is an event, never an exception."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uplimit.coding.calibration import Calibration
from uplimit.coding.sampling import SamplingParams
from uplimit.wire.fingerprint import codec_fingerprint, fingerprint_digest
from uplimit.wire.frame import (
    FrameConfig,
    FrameContent,
    FrameDecoder,
    FrameEncoder,
    encode_end,
)
from uplimit.wire.protocol import (
    RESYNC,
    Accept,
    End,
    EndReason,
    Frame,
    LedgerReport,
    Refuse,
    encode_uplink,
)
from uplimit.wire.receiver import (
    MAX_MISMATCHES_IN_A_ROW,
    MAX_REJECTED_WHILE_WAITING,
    Accepted,
    AlarmKind,
    Delivered,
    Ended,
    Failed,
    LinkState,
    Rejected,
    UplinkReceiver,
)
from uplimit.wire.streams import StreamSpec

K = 4


class Scenario:
    """Three streams answered by the tiny strong model, framed K tokens a tick, coded."""

    def __init__(self, strong, weak) -> None:
        from uplimit.coding.generate import Request, generate

        self.weak = weak
        self.config = FrameConfig(K, weak.info.n_vocab)
        self.fingerprint = codec_fingerprint(weak.info, Calibration(), self.config)
        rng = random.Random(7)
        self.specs = []
        for i, temperature in enumerate([0.0, 0.7, 1.0]):
            prompt = weak.chat_tokens([{"role": "user", "content": f"Question {i}: why?"}])
            self.specs.append(
                StreamSpec(i, tuple(prompt), SamplingParams(temperature), rng.getrandbits(64), 14)
            )
        gens, _ = generate(
            strong,
            [Request(s.prompt, s.params, s.seed, s.max_tokens) for s in self.specs],
            max_context=512,
        )
        self.contents = []
        for start in range(0, max(len(g.tokens) for g in gens), K):
            tokens = {i: tuple(g.tokens[start : start + K]) for i, g in enumerate(gens)}
            admitted = len(self.specs) if start == 0 else 0
            self.contents.append(FrameContent(admitted, {s: t for s, t in tokens.items() if t}))
        with self.side(FrameEncoder) as enc:
            self.frames = [enc.encode(c)[0] for c in self.contents]
            self.raw = {n: enc.resend(n) for n in range(len(self.frames))}  # raw n, n+1, ...

    @contextmanager
    def side(self, cls) -> Iterator:
        with self.weak.session(len(self.specs), 512) as session:
            coder = cls(session, self.weak.info.eos_ids, Calibration(), self.config)
            for spec in self.specs:
                coder.add_stream(spec)
            yield coder

    @contextmanager
    def receiver(self, **kwargs: int) -> Iterator[UplinkReceiver]:
        with self.side(FrameDecoder) as dec:
            yield UplinkReceiver(self.fingerprint, dec, **kwargs)

    @property
    def accept(self) -> bytes:
        """An accept and the ledger report that must follow it."""
        verdict = encode_uplink(Accept(fingerprint_digest(self.fingerprint)))
        return verdict + encode_uplink(REPORT)

    def wire(self, n: int) -> bytes:
        return encode_uplink(Frame(self.frames[n]))

    def resent(self, n: int) -> bytes:
        """The inner's answer to RESEND(n): the marker, then raw frames n, n+1, ..."""
        return RESYNC + b"".join(encode_uplink(Frame(f)) for f in self.raw[n])


@pytest.fixture(scope="module")
def sc(tiny_strong, tiny_weak) -> Scenario:
    return Scenario(tiny_strong, tiny_weak)


REPORT = LedgerReport(bytes(range(16)), 1234, confined=True)


def delivered(events) -> list[FrameContent]:
    return [e.content for e in events if isinstance(e, Delivered)]


def test_frames_are_delivered_in_order_whole_or_byte_by_byte(sc):
    stream = sc.accept + b"".join(map(sc.wire, range(len(sc.frames))))
    stream += encode_uplink(End(EndReason.LIFETIME))
    for chunking in ("whole", "bytes"):
        with sc.receiver() as rx:
            if chunking == "whole":
                events = rx.receive(stream)
            else:
                events = [e for i in range(len(stream)) for e in rx.receive(stream[i : i + 1])]
            events += rx.eof()
            assert isinstance(events[0], Accepted)
            assert delivered(events) == sc.contents
            assert events[-1] == Ended(EndReason.LIFETIME)
            assert rx.state is LinkState.EXHAUSTED and "lifetime" in rx.reason
            wire = [e.wire_bytes for e in events if isinstance(e, Delivered)]
            assert wire == [len(sc.wire(n)) for n in range(len(sc.frames))]


def test_a_verdict_with_another_fingerprint_fails_the_link(sc):
    with sc.receiver() as rx:
        wrong = encode_uplink(Accept(b"\x00\x00\x00\x00")) + encode_uplink(REPORT)
        events = rx.receive(wrong + sc.wire(0))
        assert events == [Failed(AlarmKind.FINGERPRINT, rx.reason)]
        assert "fingerprint digest 00000000 is not ours" in rx.reason
        assert rx.state is LinkState.FAILED and rx.receive(sc.wire(0)) == []


def test_the_ledger_report_is_judged_before_anything_is_served(sc):
    verdict = encode_uplink(Accept(fingerprint_digest(sc.fingerprint)))
    with sc.side(FrameDecoder) as dec:
        seen: list[LedgerReport] = []

        def refuse(report: LedgerReport) -> str:
            seen.append(report)
            return "a reset ledger"

        rx = UplinkReceiver(sc.fingerprint, dec, check_ledger=refuse)
        assert rx.receive(verdict) == [] and rx.state is LinkState.HANDSHAKING
        events = rx.receive(encode_uplink(REPORT) + sc.wire(0))
        assert events == [Failed(AlarmKind.LEDGER, "a reset ledger")] and seen == [REPORT]
        assert rx.delivered == 0 and rx.state is LinkState.FAILED
    with sc.receiver() as rx:  # a frame where the report must be: malformed
        (failed,) = rx.receive(verdict + sc.wire(0))
        assert failed.kind is AlarmKind.PROTOCOL and "ledger report" in failed.message


def test_a_refusal_fails_the_link_naming_the_fields(sc):
    keys = sorted(sc.fingerprint)
    with sc.receiver() as rx:
        (event,) = rx.receive(encode_uplink(Refuse(((keys.index("numpy.version"), "1.26.4"),))))
        assert event.kind is AlarmKind.FINGERPRINT
        ours = sc.fingerprint["numpy.version"]
        assert f"numpy.version: outer {ours!r}, inner '1.26.4'" in event.message


@pytest.mark.parametrize("damage", ["replay", "reorder", "truncate", "corrupt", "append"])
def test_a_bad_frame_is_rejected_then_recovered_by_a_raw_resend(sc, damage):
    bad = {
        "replay": sc.frames[0],
        "reorder": sc.frames[2],
        "truncate": sc.frames[1][:-1],
        "corrupt": bytes([sc.frames[1][0] ^ 0x10]) + sc.frames[1][1:],
        "append": sc.frames[1] + b"\x01",  # frame 1, then a byte that is no frame 2
    }[damage]
    first_bad = 2 if damage == "append" else 1
    with sc.receiver() as rx:
        events = rx.receive(sc.accept + sc.wire(0) + encode_uplink(Frame(bad)))
        # The last bytes may begin a longer frame: judged when no more come for a while.
        assert rx.incomplete and not any(isinstance(e, Rejected) for e in events)
        events += rx.expire()
        assert delivered(events) == sc.contents[:first_bad]  # nothing from the bad frame
        assert isinstance(events[-1], Rejected) and events[-1].resend_from == first_bad
        assert rx.state is LinkState.SERVING and rx.mismatches == 1 and not rx.incomplete
        # Frames already in flight are skipped, up to the marker, without a second request...
        assert rx.receive(sc.wire(first_bad) + sc.wire(2)) == []
        # ...then the raw copies of frames 1.. bring the decoder back in step, the marker
        # split across reads.
        resent = sc.resent(first_bad)
        events = rx.receive(resent[:3]) + rx.receive(resent[3:])
        assert delivered(events) == sc.contents[first_bad:]
        assert rx.state is LinkState.SERVING and not rx.incomplete


def test_a_mismatch_is_detected_by_the_next_bytes_without_waiting(sc):
    with sc.receiver() as rx:
        events = rx.receive(sc.accept + sc.wire(0) + sc.wire(0) + sc.wire(1))
        assert isinstance(events[-1], Rejected) and events[-1].resend_from == 1


def test_decoding_that_keeps_failing_fails_the_link(sc):
    """A mismatch after every resend means the two sides' weak-model numbers differ."""
    with sc.receiver() as rx:
        events = rx.receive(sc.accept + sc.wire(0))
        for _ in range(MAX_MISMATCHES_IN_A_ROW):
            events = rx.receive(encode_uplink(Frame(sc.frames[0]))) + rx.expire()  # a replay
            assert events[-1].resend_from == rx.decoder.frame_no
            # The resend is raw: it is delivered, but does not prove the codec works.
            frame_no = rx.decoder.frame_no
            events = rx.receive(RESYNC + encode_uplink(Frame(sc.raw[frame_no][0])))
            assert delivered(events) == [sc.contents[frame_no]]
        rx.receive(encode_uplink(Frame(sc.frames[0])))
        (event,) = rx.expire()
        assert event.kind is AlarmKind.DECODER and rx.state is LinkState.FAILED


def test_an_inner_that_ignores_resend_requests_fails_the_link(sc):
    limit = max(map(len, sc.frames))
    with sc.receiver(max_frame_bytes=limit) as rx:
        rx.receive(sc.accept + sc.wire(0) + sc.wire(0) + sc.wire(1))  # the replay: a mismatch
        events, fed = [], 0
        while not events:  # frames in flight are skipped, up to a bound
            events = rx.receive(sc.wire(1))
            fed += len(sc.wire(1))
        (event,) = events
        assert event.kind is AlarmKind.DECODER and "does not resend" in event.message
        assert fed > (MAX_REJECTED_WHILE_WAITING - 2) * limit


@pytest.mark.parametrize(
    ("stream", "kind", "message"),
    [
        ("", AlarmKind.CLOSED, "before the inner's verdict"),
        ("accept+frame0", AlarmKind.CLOSED, "without END"),
        ("accept+half", AlarmKind.PROTOCOL, "truncated uplink"),
        ("accept+end+garbage", AlarmKind.PROTOCOL, "after END"),
        ("accept+end(error)", AlarmKind.INNER_ERROR, "inner failed"),
    ],
)
def test_how_an_uplink_ends_decides_the_state(sc, stream, kind, message):
    data = {
        "": b"",
        "accept+frame0": sc.accept + sc.wire(0),
        "accept+half": sc.accept + sc.wire(0)[:2],
        "accept+end+garbage": sc.accept + encode_uplink(End(EndReason.SHUTDOWN)) + b"\x01",
        "accept+end(error)": sc.accept + encode_uplink(End(EndReason.ERROR)),
    }[stream]
    with sc.receiver() as rx:
        events = rx.receive(data) + rx.eof()
        failed = [e for e in events if isinstance(e, Failed)]
        assert len(failed) == 1 and failed[0].kind is kind and message in failed[0].message
        assert rx.state is LinkState.FAILED
        assert delivered(events) == (sc.contents[:1] if stream == "accept+frame0" else [])


def test_a_shutdown_end_closes_the_link(sc):
    with sc.receiver() as rx:
        events = rx.receive(sc.accept + encode_uplink(End(EndReason.SHUTDOWN))) + rx.eof()
        assert events == [Accepted(REPORT), Ended(EndReason.SHUTDOWN)]
        assert rx.state is LinkState.CLOSED


def test_an_end_sent_while_the_receiver_skips_to_the_marker_is_found(sc):
    """The inner's END can come before its resend (it had not seen RESEND yet): END carries
    the marker, so the receiver's skip stops there and the link ends as the inner said."""
    with sc.receiver() as rx:
        events = rx.receive(sc.accept + sc.wire(0) + sc.wire(0) + sc.wire(1))  # a replay
        assert isinstance(events[-1], Rejected)
        events = rx.receive(sc.wire(1) + encode_uplink(End(EndReason.SHUTDOWN))) + rx.eof()
        assert events == [Ended(EndReason.SHUTDOWN)]
        assert rx.state is LinkState.CLOSED


def test_end_without_its_marker_and_a_doubled_marker_fail_the_link(sc):
    for tail in (encode_end(EndReason.SHUTDOWN), RESYNC + encode_uplink(End(EndReason.SHUTDOWN))):
        with sc.receiver() as rx:
            (*_, event) = rx.receive(sc.accept + sc.wire(0) + tail)
            assert isinstance(event, Failed) and event.kind is AlarmKind.PROTOCOL
            assert "RESYNC" in event.message and rx.state is LinkState.FAILED


def test_a_decoder_that_crashes_fails_the_link_instead_of_raising(sc):
    class Broken:
        frame_no, awaiting_resend = 0, None

        def add_stream(self, spec):  # pragma: no cover - not called here
            pass

        def decode_next(self, data, *, final):
            raise RuntimeError("backend fell over")

    rx = UplinkReceiver(sc.fingerprint, Broken())
    (_, event) = rx.receive(sc.accept + sc.wire(0))
    assert event.kind is AlarmKind.INTERNAL and "backend fell over" in event.message


mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "delete", "insert", "duplicate"]),
        st.integers(0, 10_000),
        st.integers(1, 8),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=3,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutations=mutations, cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_damaged_uplinks_never_deliver_wrong_text_and_never_raise(sc, mutations, cuts):
    data = bytearray(sc.accept + b"".join(map(sc.wire, range(len(sc.frames)))))
    for op, at, n, blob in mutations:
        at %= len(data)
        if op == "flip":
            data[at] ^= 1 << (n % 8)
        elif op == "delete":
            del data[at : at + n]
        elif op == "insert":
            data[at:at] = blob
        else:
            data[at:at] = data[at : at + n]
        if not data:
            return
    with sc.receiver() as rx:
        events, start = [], 0
        for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
            events += rx.receive(bytes(data[start:cut]))
            start = max(start, cut)
        events += rx.eof()
        for e in events:
            if isinstance(e, Delivered):
                assert e.content == sc.contents[e.stats.frame_no]
        failures = [e for e in events if isinstance(e, Failed)]
        assert len(failures) <= 1 and (rx.state is LinkState.FAILED) == bool(failures)
