"""Frames round-trip exactly, or are rejected and recovered; nothing wrong is ever delivered."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uplimit.coding.calibration import Calibration
from uplimit.coding.sampling import SamplingParams
from uplimit.errors import ConfigError, DecodeMismatch
from uplimit.wire.frame import (
    ADMIT_BITS,
    CHECK_BITS,
    REFUSAL_BITS,
    EndMessage,
    FrameConfig,
    FrameContent,
    FrameDecoder,
    FrameEncoder,
    Refusal,
    encode_end,
    max_frame_bytes,
)
from uplimit.wire.streams import StreamSpec

K = 6  # tokens per stream per frame
PROMPTS = ["def total(values):", "Hello!", "Explain recursion.", "x = [1, 2, 3]", "café ✓"]


@contextmanager
def link(
    encoder_model, decoder_model, specs, k=K, withheld=False
) -> Iterator[tuple[FrameEncoder, FrameDecoder]]:
    config = FrameConfig(k, encoder_model.info.n_vocab, withheld_counts=withheld)
    n = max(len(specs), 1)
    with encoder_model.session(n, 512) as es, decoder_model.session(n, 512) as ds:
        enc = FrameEncoder(es, encoder_model.info.eos_ids, Calibration(), config)
        dec = FrameDecoder(ds, decoder_model.info.eos_ids, Calibration(), config)
        for spec in specs:
            enc.add_stream(spec)
            dec.add_stream(spec)
        yield enc, dec


def make_specs(model, n, rng, max_tokens=20) -> list[StreamSpec]:
    specs = []
    for i in range(n):
        params = SamplingParams(
            temperature=rng.choice([0.0, 0.0, 0.7, 1.0]),
            top_p=rng.choice([1.0, 0.9]),
            top_k=rng.choice([0, 0, 5]),
        )
        prompt = model.chat_tokens([{"role": "user", "content": rng.choice(PROMPTS)}])
        specs.append(StreamSpec(i, tuple(prompt), params, rng.getrandbits(64), max_tokens))
    return specs


def schedule(specs, rng, eos, n_vocab, withheld=False) -> list[FrameContent]:
    """A random but valid sequence of frames: streams join late, counts vary, some streams end
    by EOS, by max_tokens or explicitly, and tokens are random ids (likely or not); with
    `withheld`, streams that end say how many tokens they withheld; a few streams are refused
    as they are admitted."""
    frames, pending, active, length = [], list(range(len(specs))), [], {}
    while pending or active:
        admitted = rng.randint(0, len(pending)) if active else max(1, rng.randint(0, len(pending)))
        refused = {s: rng.choice(list(Refusal)) for s in pending[:admitted] if rng.random() < 0.1}
        for s in pending[:admitted]:
            if s not in refused:
                active.append(s)
                length[s] = 0
        pending = pending[admitted:]
        tokens, ended = {}, set()
        uniform = rng.random() < 0.5
        n_all = rng.randint(0, K)
        for s in active:
            room = specs[s].max_tokens - length[s]
            n = min(n_all if uniform else rng.randint(0, K), room)
            toks = []
            for _ in range(n):
                t = rng.choice(sorted(eos)) if rng.random() < 0.03 else rng.randrange(n_vocab)
                toks.append(t)
                if t in eos:
                    break
            if toks:
                tokens[s] = tuple(toks)
            length[s] += len(toks)
            finished = (toks and toks[-1] in eos) or length[s] >= specs[s].max_tokens
            if not finished and rng.random() < 0.05:
                ended.add(s)
        leaving = [
            s for s in active
            if s in ended or (s in tokens and tokens[s][-1] in eos)
            or length[s] >= specs[s].max_tokens
        ]  # fmt: skip
        counts = [0, 1, 2, 3, 1000, 2**31 - 1]
        kept = {s: n for s in leaving if (n := rng.choice(counts))} if withheld else {}
        frames.append(FrameContent(admitted, tokens, frozenset(ended), kept, refused))
        active = [
            s for s in active
            if s not in ended
            and not (s in tokens and tokens[s][-1] in eos)
            and length[s] < specs[s].max_tokens
        ]  # fmt: skip
    return frames


@pytest.mark.parametrize("withheld", [False, True])
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_streams=st.integers(1, 5))
def test_random_schedules_round_trip(tiny_weak, withheld, seed, n_streams):
    rng = random.Random(seed)
    specs = make_specs(tiny_weak, n_streams, rng)
    frames = schedule(specs, rng, tiny_weak.info.eos_ids, tiny_weak.info.n_vocab, withheld)
    with link(tiny_weak, tiny_weak, specs, withheld=withheld) as (enc, dec):
        for content in frames:
            data, stats = enc.encode(content)
            decoded, _ = dec.decode(data)
            assert decoded == content
            assert stats.bits <= 8 * len(data) < stats.bits + 8
        assert not enc.table.active and not dec.table.active
        assert not enc.table.pending and not dec.table.pending


def likely_frames(strong, specs, k=K) -> list[FrameContent]:
    """Frames of real generations of the tiny strong model (mostly likely tokens)."""
    from uplimit.coding.generate import Request, generate

    gens, _ = generate(
        strong,
        [Request(s.prompt, s.params, s.seed, s.max_tokens) for s in specs],
        max_context=512,
    )
    out = []
    for start in range(0, max(len(g.tokens) for g in gens), k):
        tokens = {i: tuple(g.tokens[start : start + k]) for i, g in enumerate(gens)}
        out.append(
            FrameContent(len(specs) if start == 0 else 0, {i: t for i, t in tokens.items() if t})
        )
    return out


@pytest.fixture(scope="module")
def scenario(tiny_strong, tiny_weak):
    specs = make_specs(tiny_weak, 4, random.Random(1), max_tokens=30)
    return specs, likely_frames(tiny_strong, specs)


def test_every_single_bit_flip_is_rejected_or_harmless(tiny_weak, scenario):
    """No corrupted frame is ever delivered with different content."""
    specs, frames = scenario
    with link(tiny_weak, tiny_weak, specs) as (enc, _):
        encoded = [enc.encode(c)[0] for c in frames]
    target = 1
    flips = 0
    for bit in range(8 * len(encoded[target])):
        corrupt = bytearray(encoded[target])
        corrupt[bit // 8] ^= 1 << (bit % 8)
        with link(tiny_weak, tiny_weak, specs) as (_, dec):
            dec.decode(encoded[0])
            try:
                decoded, _ = dec.decode(bytes(corrupt))
            except DecodeMismatch:
                flips += 1
                assert dec.awaiting_resend == target
                continue
            assert decoded == frames[target], f"bit {bit}: wrong content delivered"
    assert flips == 8 * len(encoded[target])  # the canonical-message check catches them all


@pytest.mark.parametrize("damage", ["truncate", "append", "replay", "swap", "empty"])
def test_malformed_frames_are_rejected_and_state_is_kept(tiny_weak, scenario, damage):
    specs, frames = scenario
    with link(tiny_weak, tiny_weak, specs) as (enc, dec):
        encoded = [enc.encode(c)[0] for c in frames]
        dec.decode(encoded[0])
        bad = {
            "truncate": encoded[1][:-1],
            "append": encoded[1] + b"\x01",
            "replay": encoded[0],
            "swap": encoded[2],
            "empty": b"",
        }[damage]
        before = {s: list(st.tokens) for s, st in dec.table.active.items()}
        with pytest.raises(DecodeMismatch):
            dec.decode(bad)
        assert {s: list(st.tokens) for s, st in dec.table.active.items()} == before
        assert dec.mismatches == 1


def test_resend_recovers_after_a_rejected_frame(tiny_weak, scenario):
    specs, frames = scenario
    with link(tiny_weak, tiny_weak, specs) as (enc, dec):
        encoded = [enc.encode(c)[0] for c in frames]
        dec.decode(encoded[0])
        corrupt = bytearray(encoded[1])
        corrupt[0] ^= 0x80
        with pytest.raises(DecodeMismatch):
            dec.decode(bytes(corrupt))
        # Frames already in flight are refused until the resend arrives...
        with pytest.raises(DecodeMismatch):
            dec.decode(encoded[2])
        assert dec.rejected == 1
        # ...then the raw copies of frames 1.. bring the decoder back in step,
        resent = enc.resend(dec.awaiting_resend)
        assert len(resent) == len(frames) - 1
        got = [dec.decode(r)[0] for r in resent]
        assert got == frames[1:]
        assert sum(map(len, resent)) > sum(map(len, encoded[1:]))  # raw costs more
        assert enc.mismatches == 1 and dec.mismatches == 1


def _read_stream(dec, stream: bytes, step: int) -> tuple[list, bytes]:
    """What `decode_next` reads from `stream` fed `step` bytes at a time, and what is left."""
    buf, pos, out = bytearray(), 0, []
    while True:
        got = dec.decode_next(bytes(buf), final=False) if buf else None
        if got is None:
            if pos >= len(stream):
                return out, bytes(buf)
            buf += stream[pos : pos + step]
            pos += step
            continue
        out.append(got if isinstance(got, EndMessage) else got[0])
        del buf[: got.bytes if isinstance(got, EndMessage) else got[1].bytes]


def test_frames_and_end_delimit_themselves_on_a_byte_stream(tiny_weak, scenario):
    """Frames follow each other with nothing between them and END last; the decoder finds
    where each ends, read whole or a few bytes at a time (None while a frame may go on)."""
    specs, frames = scenario
    with link(tiny_weak, tiny_weak, specs) as (enc, _):
        encoded = [enc.encode(c)[0] for c in frames]
    stream = b"".join(encoded) + encode_end(4)
    for step in (len(stream), 1, 3):
        with link(tiny_weak, tiny_weak, specs) as (_, dec):
            out, left = _read_stream(dec, stream, step)
            assert out == [*frames, EndMessage(4, 3)] and left == b""
            assert dec.mismatches == 0
    # A frame cut short is never delivered: it waits, and judged as it is it is rejected.
    with link(tiny_weak, tiny_weak, specs) as (_, dec):
        out, left = _read_stream(dec, encoded[0] + encoded[1][:-1], 1)
        assert out == frames[:1] and left == encoded[1][:-1]
        with pytest.raises(DecodeMismatch):
            dec.decode_next(left, final=True)


def test_a_decoder_whose_numbers_differ_never_delivers_a_wrong_frame(tiny_strong, tiny_weak):
    """Desyncs, many times over: the decoder runs another weak model than the encoder (every
    symbol's numbers differ). Over 30 scenarios no frame is delivered with content other
    than what was sent; each desync is rejected at the first frame (detection: 0 frames
    late, nothing of it delivered). The bound behind it, 2**-16 per desync, is the check's."""
    rng, wrong, detected = random.Random(11), 0, []
    for _ in range(30):
        specs = make_specs(tiny_weak, rng.randint(1, 4), rng, max_tokens=16)
        frames = likely_frames(tiny_strong, specs)
        with link(tiny_weak, tiny_strong, specs) as (enc, dec):
            for n, content in enumerate(frames):
                data, _ = enc.encode(content)
                try:
                    decoded, _ = dec.decode(data)
                except DecodeMismatch:
                    detected.append(n)
                    break
                wrong += decoded != content
    assert wrong == 0
    assert detected == [0] * 30


def test_a_decoder_with_a_different_weak_model_is_detected(tiny_strong, tiny_weak, scenario):
    """The derailment the integrity check exists for: the sides' models disagree."""
    specs, frames = scenario
    with link(tiny_weak, tiny_strong, specs) as (enc, dec):
        rejected = 0
        for content in frames:
            data, _ = enc.encode(content)
            if dec.awaiting_resend is not None:
                continue
            try:
                decoded, _ = dec.decode(data)
                assert decoded == content
            except DecodeMismatch:
                rejected += 1
        assert rejected == 1 and dec.mismatches == 1


@pytest.mark.parametrize(
    "content",
    [
        FrameContent(admitted=9),  # more than pending
        FrameContent(admitted=4, tokens={0: tuple(range(K + 1))}),  # over K
        FrameContent(admitted=4, tokens={7: (1,)}),  # unknown stream
        FrameContent(admitted=4, ended=frozenset({7})),  # unknown stream ended
    ],
)
def test_encoder_rejects_inconsistent_content_without_changing_state(tiny_weak, scenario, content):
    specs, frames = scenario
    with link(tiny_weak, tiny_weak, specs) as (enc, dec):
        with pytest.raises(ConfigError):
            enc.encode(content)
        assert enc.frame_no == 0 and len(enc.table.pending) == len(specs)
        data, _ = enc.encode(frames[0])  # still usable
        assert dec.decode(data)[0] == frames[0]


def test_tokens_after_end_of_sequence_are_refused(tiny_weak, scenario):
    specs, _ = scenario
    eos = min(tiny_weak.info.eos_ids)
    with link(tiny_weak, tiny_weak, specs[:1]) as (enc, _), pytest.raises(ConfigError):
        enc.encode(FrameContent(admitted=1, tokens={0: (5, eos, 6)}))


def test_frame_overhead_is_small_for_many_streams(tiny_strong, tiny_weak):
    """64 streams x 6 tokens: what a frame pays besides its tokens is the grammar's few fixed
    costs, however many streams it carries (the bound is the grammar's, not a measurement:
    which tokens the tiny model generates, and so the padding, differs between CPUs)."""
    rng = random.Random(3)
    specs = make_specs(tiny_weak, 64, rng, max_tokens=12)
    frames = likely_frames(tiny_strong, specs)
    # 16 check bits, <= 3 bits to terminate, < 8 to pad to a byte; a uniform count that is not
    # the last one: 2 bits + the count raw; the other flags (kind, ends, uniform) < 0.1 bit;
    # admissions: "some admitted" (6 bits) + how many (ADMIT_BITS raw).
    fixed = CHECK_BITS + 3 + 8 + 2 + FrameConfig(K).count_bits + 0.1
    admission = 6 + ADMIT_BITS
    with link(tiny_weak, tiny_weak, specs) as (enc, dec):
        for content in frames:
            data, stats = enc.encode(content)
            assert dec.decode(data)[0] == content
            overhead = 8 * len(data) - stats.token_bits
            assert overhead < fixed + (admission if content.admitted else 0)
    assert len(frames) >= 2


def test_withheld_counts_only_for_leaving_streams(tiny_weak):
    specs = make_specs(tiny_weak, 2, random.Random(3))
    with link(tiny_weak, tiny_weak, specs, withheld=True) as (enc, dec):
        with pytest.raises(ConfigError):  # stream 1 does not leave: nothing to say for it
            enc.encode(FrameContent(2, {0: (5,), 1: (6,)}, frozenset({0}), {1: 4}))
        data, _ = enc.encode(FrameContent(2, {0: (5,), 1: (6,)}, frozenset({0}), {0: 4}))
        decoded, _ = dec.decode(data)
        assert decoded.withheld == {0: 4}
        # A raw resend says it too.
        (raw,) = enc.resend(0)
    with link(tiny_weak, tiny_weak, specs, withheld=True) as (_, fresh):
        assert fresh.decode(raw)[0].withheld == {0: 4}


def test_a_refusal_takes_one_stream_out_as_it_is_admitted_in_a_few_bits(tiny_weak):
    specs = make_specs(tiny_weak, 3, random.Random(4))
    with link(tiny_weak, tiny_weak, specs) as (enc, dec):
        for wrong in (
            FrameContent(1, refused={1: Refusal.INVALID}),  # not admitted in this frame
            FrameContent(2, {1: (6,)}, refused={1: Refusal.INVALID}),  # refused, yet tokens
            FrameContent(2, ended=frozenset({1}), refused={1: Refusal.INVALID}),  # and ended
        ):
            with pytest.raises(ConfigError):
                enc.encode(wrong)
        plain, plain_stats = enc.encode(FrameContent(2, {1: (6,)}))
        assert dec.decode(plain)[0].refused == {}
    with link(tiny_weak, tiny_weak, specs) as (enc, dec):
        content = FrameContent(2, {1: (6,)}, refused={0: Refusal.CONTEXT})
        data, stats = enc.encode(content)
        assert dec.decode(data)[0] == content
        assert list(dec.table.active) == [1]  # stream 0 left unprefilled; 1 and 2 go on
        # The flag's rare branch (8 bits) and the reason, give or take the coder's rounding.
        assert stats.bits <= plain_stats.bits + 8 + REFUSAL_BITS + 1
        follow = FrameContent(1, {1: (7,), 2: (8,)})
        assert dec.decode(enc.encode(follow)[0])[0] == follow
        raw = enc.resend(0)  # a raw resend says it too
    with link(tiny_weak, tiny_weak, specs) as (_, fresh):
        assert [fresh.decode(r)[0] for r in raw] == [content, follow]


def test_a_switch_codes_new_streams_with_the_new_model_and_lets_old_ones_finish(
    tiny_strong, tiny_weak
):
    """Streams 0 and 1 start on the weak model; after the switch, 2 and 3 are coded with the
    new one (here the strong model itself, so its guesses always hit) while 0 and 1 finish on
    the old one, which then leaves. A decoder that misses the switch is caught."""
    from uplimit.coding.generate import Request, generate

    specs = make_specs(tiny_weak, 4, random.Random(5), max_tokens=24)
    gens, _ = generate(
        tiny_strong,
        [Request(s.prompt, s.params, s.seed, s.max_tokens) for s in specs],
        max_context=512,
    )
    frames = [FrameContent(2, {i: tuple(gens[i].tokens[:K]) for i in (0, 1)})]
    for j in range(1, 24 // K + 1):
        tokens = {i: tuple(gens[i].tokens[j * K : (j + 1) * K]) for i in (0, 1)}
        tokens |= {i: tuple(gens[i].tokens[(j - 1) * K : j * K]) for i in (2, 3)}
        frames.append(FrameContent(2 if j == 1 else 0, {i: t for i, t in tokens.items() if t}))

    released: list[str] = []
    hits: dict[int, list[bool]] = {i: [] for i in range(4)}
    config = FrameConfig(K, tiny_weak.info.n_vocab)
    with (
        tiny_weak.session(4, 512) as es,
        tiny_weak.session(4, 512) as ds,
        tiny_weak.session(4, 512) as stale_session,
    ):
        enc = FrameEncoder(es, tiny_weak.info.eos_ids, Calibration(), config)
        dec = FrameDecoder(ds, tiny_weak.info.eos_ids, Calibration(), config)
        stale = FrameDecoder(stale_session, tiny_weak.info.eos_ids, Calibration(), config)
        enc.observe = lambda state, _l, pred, token: hits[state.spec.stream_id].append(
            pred.guess == token
        )
        for side in (enc, dec, stale):
            side.add_stream(specs[0])
            side.add_stream(specs[1])
        first, _ = enc.encode(frames[0])
        assert dec.decode(first)[0] == frames[0] and stale.decode(first)[0] == frames[0]

        for name, side in (("encoder", enc), ("decoder", dec)):
            session = tiny_strong.session(4, 512)

            def release(name=name, session=session) -> None:
                session.close()
                released.append(name)

            side.switch(session, Calibration(), release)
        for side in (enc, dec, stale):
            side.add_stream(specs[2])
            side.add_stream(specs[3])
        assert enc.generations == dec.generations == 2

        stale_rejected = 0
        for content in frames[1:]:
            data, _ = enc.encode(content)
            assert dec.decode(data)[0] == content
            try:
                stale.decode(data)
            except DecodeMismatch:
                stale_rejected += 1
        assert stale_rejected > 0
        assert not enc.table.active and not dec.table.active
        # The first model left once streams 0 and 1 had (its session is the caller's).
        assert enc.generations == dec.generations == 1 and not released
        # Another switch releases the second model at once (no stream uses it), and `close`
        # releases the third.
        for name, side in (("encoder", enc), ("decoder", dec)):
            session = tiny_weak.session(4, 512)
            side.switch(session, Calibration(), lambda name=name, s=session: (
                s.close(), released.append(f"{name} 3")
            ))  # fmt: skip
        assert sorted(released) == ["decoder", "encoder"]
        enc.close()
        dec.close()
        assert sorted(released) == ["decoder", "decoder 3", "encoder", "encoder 3"]
    assert all(hits[2]) and all(hits[3])  # the new model is the strong one
    assert not all(hits[0] + hits[1])  # the old one misses now and then


def test_the_frame_bound_is_pinned_for_the_default_configuration() -> None:
    # 16 streams x 16 tokens x 48 bits (a coded miss at its worst) and the grammar's other
    # symbols at their worst: 13,485 bits and the termination, 1,687 bytes (the parser's old
    # cap was 1 MiB).
    assert max_frame_bytes(FrameConfig(16, 151_936), 16) == 1687
    assert max_frame_bytes(FrameConfig(16, 151_936, withheld_counts=True), 16) == 1757
    with pytest.raises(ConfigError):
        max_frame_bytes(FrameConfig(16, 151_936), 0)


@pytest.mark.parametrize("withheld", [False, True])
def test_no_frame_coded_or_raw_is_longer_than_the_bound(tiny_weak, withheld):
    """The largest frames the grammar allows: every stream admitted at once, each with K of
    the tokens the weak model finds least likely, all ended explicitly, the largest withheld
    counts; and their raw resends."""
    n, info = 4, tiny_weak.info
    rng = random.Random(7)
    specs = [
        StreamSpec(i, tuple(tiny_weak.tokenize(PROMPTS[i])), SamplingParams(), i, 2 * K)
        for i in range(n)
    ]
    with tiny_weak.session(1, 64) as probe:
        _, logits = probe.prefill(specs[0].prompt)
    unlikely = [int(t) for t in logits.argsort() if int(t) not in info.eos_ids][: 4 * K]
    with link(tiny_weak, tiny_weak, specs, withheld=withheld) as (enc, dec):
        tokens = {s.stream_id: tuple(rng.sample(unlikely, K)) for s in specs}
        ended = frozenset(tokens)
        kept = {s: 2**31 - 1 for s in tokens} if withheld else {}
        coded, stats = enc.encode(FrameContent(n, tokens, ended, kept))
        (raw,) = enc.resend(0)
        bound = max_frame_bytes(enc.config, n)
        assert stats.tokens == n * K
        assert len(coded) <= bound and len(raw) <= bound
        assert dec.decode(raw)[0].tokens == tokens  # the bound admits what is real
