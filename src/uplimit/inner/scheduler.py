"""The inner side's scheduler: continuous batching over the strong model, frame contents per tick.

Two threads drive it, and it does no I/O besides the audit store:

- `step()` (the generation thread) starts waiting candidates (one prefill each, alone), then
  feeds every running candidate's next token to the strong model in one batched call and
  samples the token after it. Requests join and leave between steps: continuous batching.
  With a drafter (speculative decoding, `draft_tokens` > 0) the weak model proposes up to that
  many tokens after each candidate's next one; the strong model evaluates them all in the same
  call (`Session.extend`), and the sampler walks along them: a draft is kept iff it equals the
  token the strong model samples at its position (with that position's noise, as without
  drafts), so the output is still exactly a sample of the strong model. The strong logits are
  then a deterministic function of the prompt, seed and `draft_tokens` (docs/serving.md).
- `take_frame()` (the frame thread, once per tick) says what the next frame carries: which
  pending streams it admits, how many tokens each active stream gets, which it ends.

Streams and candidates. Each `GenerationRequest` is one stream (one choice of an API request).
It has `best_of` candidates, sampled with `candidate_seed(stream seed, j)`; the scorer picks one
when all are done, and only that one's uploaded tokens are queued for the uplink (all go to the
audit store). With one candidate, tokens are queued as they are generated (streaming).
Candidate 0 uses the stream's own seed, so when it wins, the decoder's noise is the noise the
strong model was sampled with; other winners decode exactly too, at a few more bits per token
(the decoder's guesses are no longer coupled). At T = 0 all candidates would be identical, so
best_of is 1 there.

Frame policy. A frame is cheapest when every active stream carries the same number n of
tokens ("uniform counts", wire/frame.py): then the counts cost well under a bit. So n is the
smallest number of tokens any active stream has ready (at most K), streams that end within the
frame by EOS or max_tokens excepted, and a pending stream is admitted once it has a token ready
(admission is in the outer's order, so a stream that has none yet, e.g. one still reasoning or
choosing among candidates, holds back the ones after it). Only when some active stream has
nothing ready (it is reasoning, or was cancelled) does a frame carry unequal counts, since
waiting for it would stall every other stream.

Cadence (`max_latency_s`, `[link] max_latency_s`). A frame's own overhead (check, flags,
padding to a byte: ~3 bytes) is shared by fewer tokens the more often frames go out, so a
frame that is not full (K tokens for every stream) is taken once `max_latency_s` less one tick
has passed since a poll first found something to send, and leaves at the next tick, so tokens
wait up to max_latency_s from that poll. The frame loop polls once per tick, just after the
tick's start (`link.inner_link.serve_frames`), so a steady stream of tokens goes out every
round(max_latency_s / tick_s) ticks and keeps the timing code's cheapest symbol (0.09 bit,
`link.budget`); a poll up to half a tick early still counts, so that scheduling jitter does
not push the frame a tick later.

Compression-aware decoding (a stream's `tie_nats` or `tilt`, `coding.sampling.guided_sample`):
the token chosen also depends on the weak model's logits after the candidate's tokens, which a
weak twin per candidate gives (`inner.draft.Drafter.follow`: the drafter's own twins when
drafting, else a guide of its own, started at the first such stream). The twin evaluates
the prompt and the tokens as the decoder does, so its guess is the decoder's. Streams that ask
for it are refused when the inner keeps reasoning inside (the decoder's context is then the
uploaded tokens only) or has no weak model.

The scheduler's other parts live beside it: best-of scoring in `inner.scoring`, the streams
and candidates it runs and their audit records in `inner.runs`.

Stops: a stream ends implicitly on EOS or at max_tokens (both sides know), and explicitly
(the frame's end flag) after a stop sequence, on cancellation, or when reasoning used up the
generation limit.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from uplimit.coding.generate import Finish
from uplimit.coding.noise import PositionNoise
from uplimit.coding.sampling import guided_sample, sample
from uplimit.errors import ConfigError
from uplimit.inner.audit import AuditStore
from uplimit.inner.draft import Drafter, DraftRequest
from uplimit.inner.reasoning import NoiseKeys, Splitter
from uplimit.inner.runs import CandidateRun, StreamRun, audit_records
from uplimit.inner.scoring import Scorer, mean_logprob
from uplimit.models.base import LanguageModel, Logits
from uplimit.wire.frame import ADMIT_BITS, FrameContent, Refusal
from uplimit.wire.request import GenerationRequest, candidate_seed
from uplimit.wire.stops import StopMatcher
from uplimit.wire.streams import StreamSpec, ends_stream

__all__ = ["FramePlan", "Scheduler", "SchedulerConfig"]


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16  # strong-model sequences (candidates) generated at once
    max_streams: int = 64  # streams active in the coding table at once (weak sessions' size)
    max_context: int = 2048  # strong session context per sequence
    frame_tokens: int = 16  # K: tokens one stream may carry per frame (FrameConfig)
    reasoning: tuple[str, str] | None = None  # open and close markers of withheld text
    max_reasoning_tokens: int = 1024  # withheld tokens one candidate may generate
    prefills_per_step: int = 4  # new candidates started between two batched steps, at most
    # How long frames wait for an active stream that has no token ready (e.g. one token held
    # back as a possible reasoning marker) before carrying unequal counts, which cost bits.
    stall_patience_s: float = 0.5
    # A frame that is not full (K tokens for every stream) waits so that it leaves this long
    # after a poll first found something to send (module doc): each frame costs ~3 bytes of
    # its own (check, flags, padding), so fuller frames cost fewer bits per token, at the
    # price of text arriving in larger, later pieces. 0: a frame goes as soon as anything is
    # ready.
    max_latency_s: float = 0.0
    tick_s: float = 0.1  # the uplink's tick ([link] tick_s): the frame loop polls once per tick
    # Speculative decoding: weak-model drafts per candidate per step (0: off). Part of what
    # decides the output (module doc), so a re-run must use the same value.
    draft_tokens: int = 0
    scorer: Scorer = mean_logprob

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_streams", "max_context", "frame_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if not (self.max_latency_s >= 0 and self.tick_s > 0):  # NaN too
            raise ConfigError("max_latency_s must be >= 0 and tick_s > 0")
        if not 0 <= self.draft_tokens <= 16:
            raise ConfigError("draft_tokens must be in 0..16")
        if self.reasoning is not None and not all(self.reasoning):
            raise ConfigError("reasoning markers must be non-empty strings")


@dataclass(frozen=True)
class FramePlan:
    """What the next frame carries, and which streams leave the table after it."""

    content: FrameContent
    retired: tuple[int, ...]  # streams that leave the table after this frame


class Scheduler:
    def __init__(
        self,
        strong: LanguageModel,
        config: SchedulerConfig,
        *,
        audit: AuditStore | None = None,
        clock: Callable[[], float] = time.time,
        drafter: LanguageModel | None = None,
        guide: LanguageModel | None = None,
    ) -> None:
        """`drafter`: the weak model for speculative drafts; `guide`: the weak model that
        compression-aware decoding reads (module doc), the drafter's when drafting."""
        self.model = strong
        self.gauge_id: str | None = None  # names the weights in audit records (gauge/schedule.py)
        self.hold_starts = False  # set while draining for a model swap: start no candidate
        self.config = config
        self.audit = audit
        self.clock = clock
        self.eos = strong.info.eos_ids
        self.session = strong.session(config.max_batch, config.max_context)
        self.drafter: Drafter | None = None
        if config.draft_tokens:
            if drafter is None:
                raise ConfigError("draft_tokens > 0 needs a drafter model")
            self.drafter = Drafter(
                drafter, config.max_batch, config.max_context, config.draft_tokens
            )
        self._guide_model = guide
        self._guide: Drafter | None = self.drafter  # created at the first guided stream
        self._guide_rows: dict[CandidateRun, tuple[int, Logits]] = {}  # this step's, batched
        self._lock = threading.Lock()
        self._work = threading.Event()  # set when there may be something to generate
        self._streams: dict[int, StreamRun] = {}
        self._pending: deque[int] = deque()  # submitted, not admitted: the outer's order
        self._active: list[int] = []  # admitted, not retired: the coding table's order
        self._waiting: deque[CandidateRun] = deque()
        self._running: list[CandidateRun] = []
        self._stall_since: float | None = None
        self._due_since: float | None = None  # the first poll that found something to send
        self.generated_tokens = 0
        self.drafted_tokens = 0
        self.accepted_drafts = 0
        self.model_seconds = 0.0  # inside the strong model
        self.draft_seconds = 0.0  # inside the drafter

    # --- requests (the downlink) ------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        """Add a stream, in the order the outer side opened it."""
        spec = request.spec
        with self._lock:
            if spec.params.guided and (self.config.reasoning or self._guide_model is None):
                self._add(StreamRun(request, self.clock(), final=True, refused=Refusal.INVALID))
                return
            stream = self._add(StreamRun(request, self.clock()))
            if request.withheld_id is not None:
                self._retrieve(stream)
                return
            reasoning = self.config.max_reasoning_tokens if self.config.reasoning else 0
            limit = min(spec.max_tokens + reasoning, self.config.max_context - len(spec.prompt) - 1)
            best_of = 1 if spec.params.greedy else request.best_of
            for j in range(best_of):
                seed = candidate_seed(spec.seed, j)
                c = CandidateRun(
                    stream,
                    j,
                    seed,
                    NoiseKeys(seed),
                    Splitter(self.config.reasoning, self.model.token_bytes),
                    StopMatcher(request.stop),
                    limit,
                )
                stream.candidates.append(c)
                if limit < 1:  # the prompt leaves no room: refuse rather than say nothing
                    stream.refused = Refusal.CONTEXT
                    self._finish(c, Finish.LENGTH)
                else:
                    self._waiting.append(c)
            if best_of == 1:
                stream.upload = stream.candidates[0].uploaded  # streams as it is generated
        self._work.set()

    def refuse(self, spec: StreamSpec, why: Refusal) -> None:
        """Add a stream the inner will not serve (e.g. its options fail the inner's checks):
        the frames admit it and end it with `why`, in the outer's order like any other."""
        request = GenerationRequest(spec, f"stream-{spec.stream_id}")
        with self._lock:
            self._add(StreamRun(request, self.clock(), final=True, refused=why))

    def _add(self, stream: StreamRun) -> StreamRun:
        """Register a stream (lock held): it waits for admission in the outer's order."""
        sid = stream.request.spec.stream_id
        if sid in self._streams:
            raise ConfigError(f"stream {sid} was already submitted")
        self._streams[sid] = stream
        self._pending.append(sid)
        return stream

    def cancel(self, stream_id: int) -> None:
        """The client went away: stop generating; the stream ends at the next frame."""
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None or (stream.final and stream.sent == len(stream.upload)):
                return
            stream.cancelled = True
            del stream.upload[stream.sent :]  # what the client will not read
            for c in stream.candidates:
                if not c.done:
                    self._finish(c, Finish.CANCELLED)
            stream.final = True
        self._work.set()

    def _retrieve(self, stream: StreamRun) -> None:
        """An operator's request for withheld reasoning: upload it as the stream's tokens."""
        stream.kind = "retrieve"
        found = self.audit.withheld(stream.request.withheld_id) if self.audit else None
        stream.upload = list(found or [])[: stream.max_tokens]
        self._complete(stream)

    # --- generation ---------------------------------------------------------------------------

    def wait_for_work(self, timeout: float) -> None:
        self._work.wait(timeout)
        self._work.clear()

    def step(self) -> bool:
        """One round: start waiting candidates, then evaluate every running one's next token
        (and its drafts) and sample what follows.

        Returns False when there was nothing to do.
        """
        with self._lock:
            dropped = [c for c in self._running if c.done]
            self._running = [c for c in self._running if not c.done]
            starts: list[CandidateRun] = []
            while (
                self._waiting
                and not self.hold_starts
                and len(self._running) + len(starts) < self.config.max_batch
                and len(starts) < self.config.prefills_per_step
            ):
                c = self._waiting.popleft()
                if not c.done:
                    starts.append(c)
        for c in dropped:
            self._free(c)
        for c in starts:
            c.t_started = self.clock()
            c.gauge_id = self.gauge_id
            prompt = c.stream.request.spec.prompt
            try:
                t0 = time.perf_counter()
                c.seq, logits = self.session.prefill(prompt)
                self.model_seconds += time.perf_counter() - t0
            except ConfigError:  # e.g. a token id outside the vocabulary: end the stream
                with self._lock:
                    if not c.done:
                        self._finish(c, Finish.ERROR)
                continue
            guide = self._guide_for(c)
            if guide is not None:
                t0 = time.perf_counter()
                guide.start(c, prompt)
                self.draft_seconds += time.perf_counter() - t0
            self._advance(c, [logits], [])
        with self._lock:
            self._running.extend(c for c in starts if c.seq is not None)
            live = [c for c in self._running if not c.done]
        for c in [c for c in starts if c.done and c.seq is not None]:
            self._free(c)
        drafts = self._draft(live)
        self._follow([c for c in live if c.stream.request.spec.params.guided])
        chunks = {c.seq: [c.next, *drafts[c]] for c in live}
        if chunks:
            t0 = time.perf_counter()
            out = self.session.extend(chunks)
            self.model_seconds += time.perf_counter() - t0
        for c in live:
            chunk = chunks[c.seq]
            kept = self._advance(c, out[c.seq], drafts[c])
            if c.done:
                self._free(c)
            elif kept < len(chunk):  # forget the rejected drafts
                self.session.truncate(c.seq, self.session.length(c.seq) - len(chunk) + kept)
        return bool(dropped or starts or live)

    def _draft(self, live: list[CandidateRun]) -> dict[CandidateRun, list[int]]:
        """Each candidate's drafts: none without a drafter, none past its generation limit."""
        wants = {}
        if self.drafter is not None:
            for c in live:
                count = min(self.drafter.tokens, c.limit - len(c.tokens) - 1)
                if count > 0:
                    wants[c] = DraftRequest(c.tokens, count, self._guesser(c))
        t0 = time.perf_counter()
        drafts = self.drafter.propose(wants) if wants else {}
        self.draft_seconds += time.perf_counter() - t0
        self.drafted_tokens += sum(map(len, drafts.values()))
        return {c: drafts.get(c, []) for c in live}

    def _guide_for(self, c: CandidateRun) -> Drafter | None:
        """The weak twins `c` needs: the drafter's, or for a guided stream the guide's."""
        if self._guide is None and c.stream.request.spec.params.guided:
            # Only submit() lets a guided stream in, and only with a guide model.
            self._guide = Drafter(
                self._guide_model, self.config.max_batch, self.config.max_context, 0
            )
        if self.drafter is not None or c.stream.request.spec.params.guided:
            return self._guide
        return None

    def _follow(self, guided: list[CandidateRun]) -> None:
        """The weak logits after each guided candidate's tokens, in one batched catch-up."""
        if guided:
            t0 = time.perf_counter()
            rows = self._guide.follow({c: c.tokens for c in guided})
            self.draft_seconds += time.perf_counter() - t0
            self._guide_rows = {c: (len(c.tokens), rows[c]) for c in guided}

    def _guide_logits(self, c: CandidateRun) -> Logits:
        """The weak logits after `c`'s tokens: this step's batch, else (after a kept draft)
        a catch-up of this one candidate."""
        n, row = self._guide_rows.get(c, (-1, None))
        if n != len(c.tokens):
            t0 = time.perf_counter()
            row = self._guide.follow({c: c.tokens})[c]
            self.draft_seconds += time.perf_counter() - t0
        return row

    def _guesser(self, c: CandidateRun) -> Callable[[Logits, int], int]:
        """A draft is the token the strong sampler would pick from the weak model's logits."""
        params = c.stream.request.spec.params
        inside, position = c.splitter.inside, len(c.uploaded) + len(c.splitter.held)

        def guess(logits: Logits, ahead: int) -> int:
            noise = None
            if not params.greedy:
                seed, at = c.noise.predict(inside, position, ahead)
                noise = PositionNoise.draw(seed, at, logits.size)
            return sample(logits, params, noise)

        return guess

    def _advance(self, c: CandidateRun, rows: Sequence[Logits], drafts: Sequence[int]) -> int:
        """Sample from the strong logits `rows` in turn, while the samples confirm the drafts.

        Row j follows the j-th token fed in this round (the candidate's next token, then the
        drafts). Its sample is the strong model's own choice there, exactly as without
        drafts; draft j is kept iff it equals that choice. The first sample that is not a
        draft becomes the next token. Returns how many fed tokens the strong cache keeps.
        """
        for j, row in enumerate(rows):
            token, logprob = self.choose(c, row)
            confirmed = j < len(drafts) and token == drafts[j]
            with self._lock:
                if not c.done:  # a cancel may have come in meanwhile
                    self._accept(c, token, logprob)
                    self.generated_tokens += 1
                    self.accepted_drafts += confirmed
                if c.done:
                    return j + 1
            if not confirmed:
                c.next = token
                return j + 1
        raise AssertionError("one row more than drafts")  # unreachable: the last row ends it

    def _free(self, c: CandidateRun) -> None:
        if c.seq is not None:
            self.session.drop(c.seq)
            guide = self._guide_for(c)
            if guide is not None:
                guide.drop(c)
            self._guide_rows.pop(c, None)
            c.seq = None

    def choose(self, c: CandidateRun, logits: Logits) -> tuple[int, float]:
        """The one place a candidate's next token and its log-probability are chosen: the
        outer's seeded noise at the token's position (`redteam.stego` overrides it)."""
        params = c.stream.request.spec.params
        noise = None
        if not params.greedy:
            if c.splitter.inside:
                seed, position = c.noise.withheld()
            else:
                seed, position = c.noise.uploaded(len(c.uploaded) + len(c.splitter.held))
            noise = PositionNoise.draw(seed, position, logits.size)
        weak = self._guide_logits(c) if params.guided else None
        token = guided_sample(logits, weak, params, noise)
        x = logits.astype(np.float64)
        top = x.max()
        logprob = float(x[token] - top - np.log(np.exp(x - top).sum()))
        return token, logprob

    def _accept(self, c: CandidateRun, token: int, logprob: float) -> None:
        """Record a sampled token: split it, stop on EOS, a stop sequence or a limit."""
        c.tokens.append(token)
        c.logprobs.append(logprob)
        if c.t_first is None:
            c.t_first = self.clock()
        if token in self.eos:
            self._upload(c, [*c.splitter.flush(), token])
            self._finish(c, Finish.EOS)
            return
        split = c.splitter.push(token)
        c.withheld.extend(split.withheld)
        self._upload(c, split.uploaded)
        if not c.done and len(c.tokens) >= c.limit:
            self._upload(c, c.splitter.flush())
            self._finish(c, Finish.LENGTH)

    def _upload(self, c: CandidateRun, tokens: list[int]) -> None:
        """Queue tokens for the uplink, one by one, up to a stop sequence or max_tokens."""
        for t in tokens:
            if c.done:
                return
            c.uploaded.append(t)
            if t not in self.eos:
                c.stop.feed(self.model.token_bytes(t))
            if c.stop.stopped:
                self._finish(c, Finish.STOP)
            elif len(c.uploaded) >= c.stream.max_tokens and t not in self.eos:
                self._finish(c, Finish.LENGTH)

    def _finish(self, c: CandidateRun, reason: Finish) -> None:
        c.done, c.finish, c.t_done = True, reason, self.clock()
        stream = c.stream
        if all(x.done for x in stream.candidates) and not stream.final:
            served = [x for x in stream.candidates if x.finish is not Finish.ERROR]
            if not served and not stream.admitted:  # all failed: refuse this stream alone
                stream.refused = Refusal.FAILED
            elif not stream.cancelled and served:
                stream.chosen = max(served, key=self.config.scorer)
                stream.upload = stream.chosen.uploaded
            self._complete(stream)

    def _complete(self, stream: StreamRun) -> None:
        """All candidates are done: audit them, then let the frames finish the stream."""
        if self.audit is not None:
            records = audit_records(stream, self.model, self.config.scorer)
            ids = self.audit.record(records)
            chosen = [i for i, r in zip(ids, records, strict=True) if r.chosen]
            stream.audit_row = chosen[0] if chosen else None
        stream.final = True

    # --- frames -------------------------------------------------------------------------------

    def take_frame(self) -> FramePlan | None:
        """What the next frame says, or None when it should say nothing yet (module doc)."""
        k = self.config.frame_tokens
        with self._lock:
            streams = self._streams

            def ready(sid: int) -> int:
                return len(streams[sid].upload) - streams[sid].sent

            def cap(sid: int) -> int:
                # A stream that ends by EOS or max_tokens within the frame may carry fewer.
                return k if self._ends_implicitly(streams[sid]) else min(ready(sid), k)

            admit: list[int] = []
            room = min(self.config.max_streams - len(self._active), (1 << ADMIT_BITS) - 1)
            for sid in self._pending:
                if len(admit) >= room or not (cap(sid) > 0 or streams[sid].final):
                    break
                admit.append(sid)
            refusing = {sid: why for sid in admit if (why := streams[sid].refused) is not None}
            order = self._active + [sid for sid in admit if sid not in refusing]
            n = min((cap(sid) for sid in order), default=0)
            if n == 0 and any(ready(sid) for sid in order):
                if any(cap(sid) == 0 and streams[sid].final for sid in order):
                    pass  # streams to end with no tokens: a frame of ends only (n = 0)
                elif self._stall_patience_over():
                    n = k  # unequal counts: each stream carries what it has
                else:
                    return None  # a stream is about to have tokens: wait for it
            self._stall_since = None
            counts = {sid: min(n, ready(sid)) for sid in order}
            ended = frozenset(
                sid
                for sid in order
                if streams[sid].final
                and not self._ends_implicitly(streams[sid])
                and streams[sid].sent + counts[sid] == len(streams[sid].upload)
            )
            if not admit and not ended and not any(counts.values()):
                self._due_since = None
                return None
            if n < k and not self._deadline_passed():
                return None
            self._due_since = None
            tokens = {}
            for sid in order:
                s = streams[sid]
                if counts[sid]:
                    tokens[sid] = tuple(s.upload[s.sent : s.sent + counts[sid]])
                    s.sent += counts[sid]
            for sid in admit:
                self._pending.popleft()
                streams[sid].admitted = True
            retired = tuple(refusing) + tuple(
                sid for sid in order if sid in ended or (streams[sid].final and ready(sid) == 0)
            )
            self._active = [sid for sid in order if sid not in retired]
            withheld = {}
            if self.config.reasoning:  # the frame says how much each leaving stream kept inside
                for sid in retired:
                    chosen = streams[sid].chosen
                    withheld[sid] = len(chosen.withheld) if chosen else 0
            return FramePlan(FrameContent(len(admit), tokens, ended, withheld, refusing), retired)

    def _deadline_passed(self) -> bool:
        """Whether a frame that is not full may go now (it leaves at the next tick):
        `max_latency_s` less that tick after the poll that first found something to send,
        half a tick early counting (module doc)."""
        now = time.monotonic()
        if self._due_since is None:
            self._due_since = now
        return now - self._due_since >= self.config.max_latency_s - 1.5 * self.config.tick_s

    def _stall_patience_over(self) -> bool:
        now = time.monotonic()
        if self._stall_since is None:
            self._stall_since = now
        return now - self._stall_since >= self.config.stall_patience_s

    def _ends_implicitly(self, s: StreamRun) -> bool:
        """The stream's last queued token ends it on both sides without an end flag."""
        return s.final and ends_stream(s.upload, s.max_tokens, self.eos)

    def release(self, stream_id: int, bits: float) -> None:
        """A retired stream's last frame was sent: note its cost and forget it."""
        with self._lock:
            stream = self._streams.pop(stream_id)
        if self.audit is not None and stream.audit_row is not None:
            self.audit.mark_uploaded(stream.audit_row, bits, self.clock())

    # --- swapping the strong model (a gauge rotation) -------------------------------------------

    @property
    def busy(self) -> bool:
        """Some candidate holds a sequence in the strong session (is being generated)."""
        with self._lock:
            return any(c.seq is not None for c in self._running)

    def swap_model(self, strong: LanguageModel, gauge_id: str | None) -> LanguageModel:
        """Serve from `strong` from the next step on; returns the old model (not closed).

        Call from the generation thread when not `busy` (`hold_starts` drains it), so that a
        candidate is generated by one copy from its prefill to its end. Clears `hold_starts`.
        """
        if self.busy:
            raise ConfigError("swap_model while candidates are running: drain first")
        if strong.vocab_digest() != self.model.vocab_digest():
            raise ConfigError("the new strong model has another tokenizer")
        old, self.model = self.model, strong
        self.session.close()
        self.session = strong.session(self.config.max_batch, self.config.max_context)
        self.gauge_id = gauge_id
        self.hold_starts = False
        self._work.set()
        return old

    # --- state --------------------------------------------------------------------------------

    def candidate_tokens(self, stream_id: int) -> list[list[int]]:
        """Each candidate's tokens so far, chosen or not (a spot-check's re-run reads them)."""
        with self._lock:
            return [list(c.tokens) for c in self._streams[stream_id].candidates]

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._streams

    def close(self) -> None:
        self.session.close()
        if self._guide is not None:
            self._guide.close()  # the drafter, when drafting
