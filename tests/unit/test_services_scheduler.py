"""The inner scheduler, synchronously: frames decode to exactly what the audit store says was
uploaded; best-of-N uploads one candidate; reasoning never reaches a frame; stops and cancels."""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest

from support.scripted import ScriptedModel
from uplimit.coding.calibration import Calibration
from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.errors import ConfigError
from uplimit.inner.audit import AuditStore
from uplimit.inner.scheduler import Scheduler, SchedulerConfig
from uplimit.inner.scoring import mean_logprob
from uplimit.wire.frame import FrameConfig, FrameDecoder, FrameEncoder, Refusal
from uplimit.wire.request import GenerationRequest, candidate_seed
from uplimit.wire.stops import StopMatcher
from uplimit.wire.streams import StreamSpec

K = 4


class Link:
    """Scheduler -> encoder -> bytes -> decoder, in one thread."""

    def __init__(
        self, strong, weak, config: SchedulerConfig, audit=None, drafter=None, guide=None
    ) -> None:
        self.sched = Scheduler(strong, config, audit=audit, drafter=drafter, guide=guide)
        fc = FrameConfig(config.frame_tokens, weak.info.n_vocab, config.reasoning is not None)
        self._es = weak.session(config.max_streams, config.max_context)
        self._ds = weak.session(config.max_streams, config.max_context)
        self.enc = FrameEncoder(self._es, weak.info.eos_ids, Calibration(), fc)
        self.dec = FrameDecoder(self._ds, weak.info.eos_ids, Calibration(), fc)
        self.frames: list[bytes] = []
        self.decoded: dict[int, list[int]] = {}
        self.ended: set[int] = set()
        self.bits = 0

    def submit(self, request: GenerationRequest) -> None:
        self.enc.add_stream(request.spec)
        self.dec.add_stream(request.spec)
        self.sched.submit(request)

    def tick(self) -> bool:
        frame = self.sched.take_frame()
        if frame is None:
            return False
        data, _ = self.enc.encode(frame.content)
        self.frames.append(data)
        self.bits += 8 * len(data)
        content, _ = self.dec.decode(data)
        for s, toks in content.tokens.items():
            self.decoded.setdefault(s, []).extend(toks)
        for s in frame.retired:
            self.sched.release(s, 0.0)
            self.ended.add(s)
        assert set(self.dec.table.active) == set(self.enc.table.active)
        return True

    def run(self, max_rounds: int = 5000, between=None) -> None:
        for i in range(max_rounds):
            worked = self.sched.step()
            self.tick()
            if between:
                between(i)
            if not worked and self.sched.idle:
                return
        raise AssertionError("did not finish")

    def close(self) -> None:
        self.sched.close()
        self._es.close()
        self._ds.close()


def request(model, i, text="Hello!", *, t=0.7, max_tokens=12, **kw) -> GenerationRequest:
    prompt = tuple(model.chat_tokens([{"role": "user", "content": text}]))
    spec = StreamSpec(i, prompt, SamplingParams(temperature=t), 1000 + i, max_tokens)
    return GenerationRequest(spec, f"req-{i}", **kw)


@pytest.fixture
def audit(tmp_path):
    store = AuditStore(tmp_path / "audit.db")
    yield store
    store.close()


def test_frames_decode_to_the_audited_uploads(tiny_strong, tiny_weak, audit):
    link = Link(tiny_strong, tiny_weak, SchedulerConfig(max_batch=6, frame_tokens=K), audit)
    rng = random.Random(0)
    texts = ["Hello!", "Write a function.", "Explain recursion.", "x = [1, 2]"]
    for i in range(10):
        link.submit(request(tiny_strong, i, rng.choice(texts), t=rng.choice([0.0, 0.7, 1.0]),
                            max_tokens=rng.randint(1, 30)))  # fmt: skip
    link.run()
    assert link.ended == set(range(10))
    for i in range(10):
        (rec,) = audit.query(request_id=f"req-{i}")
        assert rec.chosen and rec.uploaded == link.decoded.get(i, [])
        assert rec.bits_uploaded == 0.0
        assert len(rec.uploaded) <= rec.params["max_tokens"]
    link.close()


def test_matches_generation_alone(tiny_strong, tiny_weak):
    """Continuous batching changes nothing: each stream's tokens equal a run on its own."""
    reqs = [request(tiny_strong, i, t=0.8, max_tokens=20) for i in range(4)]
    together = Link(tiny_strong, tiny_weak, SchedulerConfig(max_batch=2, frame_tokens=K))
    for r in reqs:
        together.submit(r)
    together.run()
    for r in reqs:
        alone = Link(tiny_strong, tiny_weak, SchedulerConfig(max_batch=1, frame_tokens=K))
        alone.submit(r)
        alone.run()
        assert alone.decoded[r.spec.stream_id] == together.decoded[r.spec.stream_id]
        alone.close()
    together.close()


def test_uniform_frames_are_cheap(tiny_strong, tiny_weak):
    """Streams started together and never paused cost nothing for counts: every frame but
    the last few (streams ending unevenly) uses one uniform count."""
    link = Link(tiny_strong, tiny_weak, SchedulerConfig(max_batch=8, frame_tokens=K))
    for i in range(8):
        link.submit(request(tiny_strong, i, t=0.0, max_tokens=40))
    link.run()
    n_tokens = sum(map(len, link.decoded.values()))
    assert n_tokens > 8 * 10
    # Greedy on the tiny pair; what matters is that no frame pays per-stream counts.
    assert link.bits / n_tokens < 8


def test_best_of_uploads_only_the_chosen_candidate(tiny_strong, tiny_weak, audit):
    link = Link(tiny_strong, tiny_weak, SchedulerConfig(max_batch=8, frame_tokens=K), audit)
    link.submit(request(tiny_strong, 0, t=1.0, max_tokens=15, best_of=4))
    link.submit(request(tiny_strong, 1, t=1.0, max_tokens=15))  # behind it in the queue
    link.run()
    recs = audit.query(request_id="req-0")
    assert len(recs) == 4 and sum(r.chosen for r in recs) == 1
    chosen = next(r for r in recs if r.chosen)
    assert chosen.uploaded == link.decoded[0]
    assert [r.seed for r in recs] == [candidate_seed(1000, j) for j in range(4)]
    # The scorer picked the best candidate, and the candidates differ.
    assert chosen.score == max(r.score for r in recs)
    assert len({tuple(r.tokens) for r in recs}) > 1
    for r in recs:
        if not r.chosen:
            assert r.uploaded == [] and r.tokens != link.decoded[0]
    link.close()


def test_best_of_is_one_at_temperature_zero(tiny_strong, tiny_weak, audit):
    link = Link(tiny_strong, tiny_weak, SchedulerConfig(frame_tokens=K), audit)
    link.submit(request(tiny_strong, 0, t=0.0, best_of=3))
    link.run()
    assert len(audit.query(request_id="req-0")) == 1
    link.close()


def test_stop_sequence_ends_the_stream_after_its_token(tiny_strong, tiny_weak, audit):
    # Find text the model produces, then ask it to stop there.
    probe = Link(tiny_strong, tiny_weak, SchedulerConfig(frame_tokens=K))
    probe.submit(request(tiny_strong, 0, t=0.0, max_tokens=30))
    probe.run()
    full = probe.decoded[0]
    probe.close()
    eos = tiny_strong.info.eos_ids

    def text(t):
        return "" if t in eos else tiny_strong.token_bytes(t).decode("utf-8", "ignore").strip()

    stop_at = next(i for i in range(3, len(full)) if text(full[i]))
    piece = text(full[stop_at])
    link = Link(tiny_strong, tiny_weak, SchedulerConfig(frame_tokens=K), audit)
    link.submit(request(tiny_strong, 0, t=0.0, max_tokens=30, stop=(piece,)))
    link.run()
    got = link.decoded[0]
    assert got == full[: len(got)] and len(got) <= stop_at + 1
    matcher = StopMatcher([piece])
    for t in got:
        assert not matcher.stopped and t not in eos
        matcher.feed(tiny_strong.token_bytes(t))
    assert matcher.stopped  # the outer, fed the same tokens, stops at the same one
    assert audit.query(request_id="req-0")[0].finish_reason == "stop"
    link.close()


def test_cancel_ends_streams_anywhere(tiny_strong, tiny_weak, audit):
    link = Link(tiny_strong, tiny_weak, SchedulerConfig(max_batch=2, frame_tokens=K), audit)
    for i in range(6):
        link.submit(request(tiny_strong, i, max_tokens=200, best_of=2 if i == 3 else 1))

    def cancel(i):
        if i in (0, 3):
            link.sched.cancel(i)  # active, or still pending
        if i == 5:
            link.sched.cancel(4)
            link.sched.cancel(3)  # twice: no effect

    link.run(between=cancel)
    assert link.ended == set(range(6))
    for i in range(6):
        rec = next(r for r in audit.query(request_id=f"req-{i}") if r.chosen or i in (0, 3, 4))
        if i in (0, 3, 4):
            assert rec.finish_reason == "cancelled"
    link.close()


def test_streams_the_inner_cannot_serve_are_refused_alone(tiny_strong, tiny_weak, audit):
    """#16 item 2: options the inner rejects, a prompt that fills its context and a prompt
    its model fails on are each refused as they are admitted, with their reason, and never
    reach the weak model; the streams around them are served as if they were not there."""
    config = SchedulerConfig(max_batch=4, frame_tokens=K, max_context=64)
    link = Link(tiny_strong, tiny_weak, config, audit)
    alone = Link(tiny_strong, tiny_weak, config)
    long_prompt = tuple(request(tiny_strong, 0, "word " * 80).spec.prompt)
    assert len(long_prompt) > config.max_context
    bad_token = (tiny_strong.info.n_vocab + 7,)  # the strong model cannot prefill it
    for i in range(5):
        if i == 1:
            spec = StreamSpec(i, long_prompt, SamplingParams(), 1, 8)
            link.submit(GenerationRequest(spec, "req-1"))
        elif i == 2:
            spec = request(tiny_strong, i).spec
            link.enc.add_stream(spec)
            link.dec.add_stream(spec)
            link.sched.refuse(spec, Refusal.INVALID)
        elif i == 3:
            link.submit(GenerationRequest(StreamSpec(i, bad_token, SamplingParams(), 1, 8), "r"))
        else:
            link.submit(request(tiny_strong, i))
            alone.submit(request(tiny_strong, i))
    refused = {}
    decode = link.dec.decode

    def record(data: bytes):
        content, stats = decode(data)
        refused.update(content.refused)
        return content, stats

    link.dec.decode = record
    link.run()
    alone.run()
    assert refused == {1: Refusal.CONTEXT, 2: Refusal.INVALID, 3: Refusal.FAILED}
    assert link.ended == set(range(5)) and not link.dec.table.active
    assert {i: link.decoded[i] for i in (0, 4)} == alone.decoded
    assert not refused.keys() & link.decoded.keys()
    link.close()
    alone.close()


def test_reasoning_is_withheld_from_every_frame(tiny_strong, tiny_weak, audit):
    secret = "Let me think: the answer is 42."
    visible_before = "Sure."
    script = tiny_strong.tokenize(f"{visible_before}<think>{secret}</think>")
    strong = ScriptedModel(tiny_strong, script)
    config = SchedulerConfig(frame_tokens=K, reasoning=("<think>", "</think>"))
    link = Link(strong, tiny_weak, config, audit)
    for i in range(3):
        link.submit(request(tiny_strong, i, t=[0.0, 0.7, 1.0][i], max_tokens=20))
    link.run()
    for i in range(3):
        (rec,) = audit.query(request_id=f"req-{i}")
        assert rec.uploaded == link.decoded[i]
        text = tiny_strong.detokenize(rec.uploaded)
        assert text.startswith(visible_before) and "think" not in text and "42" not in text
        assert secret in tiny_strong.detokenize(rec.withheld)
        assert rec.withheld_id == f"req-{i}/{i}"
        assert len(rec.uploaded) == 20  # max_tokens counts uploaded tokens only
        assert rec.tokens[: len(script)] == script
    # A fresh decoder replaying every frame sees no token of the reasoning.
    replay = Link(tiny_strong, tiny_weak, config)
    for i in range(3):
        replay.dec.add_stream(request(tiny_strong, i, t=[0.0, 0.7, 1.0][i], max_tokens=20).spec)
    seen = []
    for data in link.frames:
        content, _ = replay.dec.decode(data)
        seen += [t for toks in content.tokens.values() for t in toks]
    assert secret.encode() not in b"".join(tiny_strong.token_bytes(t) for t in seen)
    replay.close()
    link.close()


def test_retrieval_uploads_withheld_reasoning(tiny_strong, tiny_weak, audit):
    script = tiny_strong.tokenize("<think>secret plan</think>ok")
    strong = ScriptedModel(tiny_strong, script)
    config = SchedulerConfig(frame_tokens=K, reasoning=("<think>", "</think>"))
    link = Link(strong, tiny_weak, config, audit)
    link.submit(request(tiny_strong, 0, max_tokens=5))
    link.run()
    withheld = audit.query(request_id="req-0")[0].withheld
    link.submit(request(tiny_strong, 1, t=0.0, max_tokens=500, withheld_id="req-0/0"))
    link.submit(request(tiny_strong, 2, t=0.0, max_tokens=500, withheld_id="no-such-id"))
    link.run()
    assert link.decoded[1] == withheld
    assert "secret plan" in tiny_strong.detokenize(link.decoded[1])
    assert 2 not in link.decoded and 2 in link.ended
    (rec,) = audit.query(request_id="req-1")
    assert rec.kind == "retrieve" and rec.uploaded == withheld
    link.close()


def test_mean_logprob_scorer():
    class C:
        tokens, uploaded, logprobs = [1, 2], [1, 2], [-1.0, -3.0]

    assert mean_logprob(C()) == -2.0


def test_max_latency_fills_frames(tiny_strong, tiny_weak):
    """Waiting for frames to fill (max_latency_s) puts more tokens in each frame."""

    def tokens_per_frame(latency):
        link = Link(tiny_strong, tiny_weak, SchedulerConfig(frame_tokens=8, max_latency_s=latency))
        for i in range(3):
            link.submit(request(tiny_strong, i, t=0.0, max_tokens=40))
        link.run(max_rounds=100_000)
        n = sum(map(len, link.decoded.values())) / len(link.frames)
        link.close()
        return n

    assert tokens_per_frame(1.0) > 2 * tokens_per_frame(0.0)


def test_a_frame_that_is_not_full_waits_for_the_deadline_and_no_longer(tiny_strong, tiny_weak):
    """A frame is taken max_latency_s less a tick and a half after a poll first found tokens to
    send (it leaves at the next tick), not before, and without much delay after; a full frame,
    or one whose streams all end in it, does not wait."""
    latency, tick = 0.3, 0.1
    config = SchedulerConfig(frame_tokens=255, max_latency_s=latency, tick_s=tick)
    link = Link(tiny_strong, tiny_weak, config)
    link.submit(request(tiny_strong, 0, "Explain recursion.", t=1.0, max_tokens=40))
    waits, due = [], None
    while 0 not in link.ended:
        link.sched.step()
        time.sleep(0.02)  # a token every 20 ms: slower than the deadline
        now = time.monotonic()
        if due is None and link.sched._streams[0].upload[link.sched._streams[0].sent :]:
            due = now
        if link.tick():
            waits.append(now - due)
            due = None
    link.close()
    *steady, last = waits  # the last frame ends the stream: no more tokens to wait for
    assert len(steady) >= 2, link.decoded
    assert all(latency - 1.5 * tick <= w < latency + 1.0 for w in steady), waits
    assert last < latency + 1.0

    full = Link(tiny_strong, tiny_weak, SchedulerConfig(frame_tokens=2, max_latency_s=60.0))
    full.submit(request(tiny_strong, 0, "Explain recursion.", t=1.0, max_tokens=12))
    full.run(max_rounds=100)  # 100 quick rounds: a frame that waited 60 s would not be sent
    assert 0 in full.ended and len(full.decoded[0]) > 2
    assert len(full.frames) == -(-len(full.decoded[0]) // 2)
    full.close()


def _decoded(strong, weak, requests, drafter=None, guide=None, **config):
    link = Link(strong, weak, SchedulerConfig(frame_tokens=K, **config), drafter=drafter,
                guide=guide)  # fmt: skip
    for r in requests:
        link.submit(r)
    link.run()
    stats = link.sched.drafted_tokens, link.sched.accepted_drafts
    link.close()
    return link.decoded, stats


@pytest.mark.parametrize("t", [0.0, 0.7, 1.0])
def test_speculation_changes_no_token(tiny_strong, tiny_weak, t):
    """The tiny backend's `extend` gives step's logits, so with any drafter the tokens must be
    exactly those of plain decoding: drafts are only kept when the strong sampler agrees."""
    reqs = [request(tiny_strong, i, text, t=t, max_tokens=25, best_of=1 + i % 2)
            for i, text in enumerate(["Hello!", "Explain recursion.", "x = [1, 2]"])]  # fmt: skip
    plain, _ = _decoded(tiny_strong, tiny_weak, reqs, max_batch=4)
    for k in (1, 4):
        fast, (drafted, accepted) = _decoded(
            tiny_strong, tiny_weak, reqs, max_batch=4, draft_tokens=k, drafter=tiny_weak
        )
        assert fast == plain
        assert 0 < accepted < drafted


def test_a_perfect_drafter_is_always_accepted(tiny_strong, tiny_weak):
    """With the strong model as its own drafter every draft must be kept: the guess uses the
    same noise key as the sample at that position (at T > 0 too)."""
    reqs = [request(tiny_strong, i, t=t, max_tokens=30) for i, t in enumerate([0.0, 0.8, 1.0])]
    _, (drafted, accepted) = _decoded(
        tiny_strong, tiny_weak, reqs, draft_tokens=3, drafter=tiny_strong
    )
    assert drafted > 30 and accepted == drafted


def test_speculation_keeps_reasoning_exact(tiny_strong, tiny_weak):
    script = tiny_strong.tokenize("Sure.<think>the answer is 42.</think>")
    strong = ScriptedModel(tiny_strong, script)
    config = {"reasoning": ("<think>", "</think>"), "max_batch": 3}
    reqs = [request(tiny_strong, i, t=t, max_tokens=20) for i, t in enumerate([0.0, 0.7, 1.0])]
    plain, _ = _decoded(strong, tiny_weak, reqs, **config)
    fast, (drafted, _) = _decoded(strong, tiny_weak, reqs, draft_tokens=4, drafter=strong, **config)
    assert fast == plain and drafted > 0


def test_drafts_need_a_drafter(tiny_strong):
    with pytest.raises(ConfigError, match="drafter"):
        Scheduler(tiny_strong, SchedulerConfig(draft_tokens=2))


@pytest.mark.parametrize("draft_tokens", [0, 3])
def test_guided_streams_are_what_generation_alone_gives(tiny_strong, tiny_weak, draft_tokens):
    """tie_nats and tilt through the scheduler (continuous batching, drafts or not, guided and
    plain streams mixed): each stream is the reference run of `generate` with the weak model,
    which is what the spot-check verifier re-runs."""
    knobs = [(0.0, 3.0, 0.0), (1.0, 0.0, 0.5), (0.0, 0.0, 0.0), (0.8, 0.0, 1.0)]
    reqs = []
    for i, (t, tie, tilt) in enumerate(knobs):
        r = request(tiny_strong, i, ["Hello!", "Explain recursion.", "x = [1, 2]"][i % 3], t=t,
                    max_tokens=20)  # fmt: skip
        spec = replace(r.spec, params=SamplingParams(t, tie_nats=tie, tilt=tilt))
        reqs.append(GenerationRequest(spec, r.request_id))
    drafter = tiny_weak if draft_tokens else None
    served, _ = _decoded(tiny_strong, tiny_weak, reqs, drafter=drafter, guide=tiny_weak,
                         max_batch=2, draft_tokens=draft_tokens)  # fmt: skip
    steered = 0
    for r in reqs:
        s = r.spec
        req = Request(s.prompt, s.params, s.seed, s.max_tokens)
        [alone], _ = generate(tiny_strong, [req], max_context=256, weak=tiny_weak)
        assert served[s.stream_id] == alone.tokens
        steered += alone.steered
    assert steered > 0


def test_guided_streams_are_refused_without_a_guide_or_with_reasoning(tiny_strong, tiny_weak):
    r = request(tiny_strong, 0, t=0.0)
    spec = replace(r.spec, params=SamplingParams(0.0, tie_nats=1.0))
    for guide, reasoning in ((None, None), (tiny_weak, ("<think>", "</think>"))):
        link = Link(tiny_strong, tiny_weak, SchedulerConfig(frame_tokens=K, reasoning=reasoning),
                    guide=guide)  # fmt: skip
        refused = {}
        decode = link.dec.decode

        def record(data: bytes, decode=decode, refused=refused):
            content, stats = decode(data)
            refused.update(content.refused)
            return content, stats

        link.dec.decode = record
        link.submit(GenerationRequest(spec, "req-0"))
        link.run()
        assert refused == {0: Refusal.INVALID} and not link.decoded
        link.close()
