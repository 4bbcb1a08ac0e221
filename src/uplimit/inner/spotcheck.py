"""Spot-check verification: re-run a random sample of served streams and compare tokens.

The outer side chooses every seed, so an honest stream's tokens are a deterministic function
of (prompt, sampling parameters, seed, strong model) (DESIGN.md, invariant 6; the llama.cpp
backend is batch-invariant, `tests/integration/test_llama_determinism.py`). A verifier with
its own copy of the strong model, in its own process, regenerates a stream and compares: any
token that differs is an alarm. An inner that hides bits in its token choices (steganography
at T > 0, non-greedy tokens at T = 0) must deviate from that function, so each checked stream
that carries hidden bits is caught.

What to check is what crossed the uplink: the tokens the outer decoded (its `Choice` events,
or the decoder's output), with the spec the outer sent down. Checking the inner's own audit
records would trust the party under suspicion.

Where nondeterminism could come from, and why it does not here: batch composition (the
backend configuration FACTS.md found batch-invariant, one token per sequence per call on both
sides), threads (bit-identical across 1 and 2 threads there), and the build (the checker must
run the same llama.cpp build on the same kind of CPU as the server; the codec fingerprint
already pins the weak side's). Stop sequences and cancellation only shorten a stream, so a
served stream must be a prefix of the regenerated one.

Best-of-N: the served stream is one of the candidates (`candidate_seed`), and which one is not
on the wire, so a served stream agrees if it is a prefix of any candidate (the choice among N
candidates, at most log2 N bits per stream, is not checked). Speculative decoding
(`inner.draft_tokens` > 0) makes the output a function of the drafts too, so the re-run then
goes through the scheduler with the inner's configuration and weak model (`Speculation`).
Compression-aware decoding (a spec's tie_nats or tilt) makes the output a function of the weak
model too: the re-run then needs it (`weak`), and a check without it is an error, never a pass.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from dataclasses import dataclass

from uplimit.coding.generate import Request, generate
from uplimit.errors import BackendError, ConfigError
from uplimit.inner.draft import common_prefix
from uplimit.inner.scheduler import Scheduler, SchedulerConfig
from uplimit.models.base import LanguageModel
from uplimit.wire.checks import CheckJob, pick
from uplimit.wire.request import GenerationRequest, candidate_seed

__all__ = [
    "Speculation",
    "SpotChecker",
    "Verdict",
    "verify",
]


@dataclass(frozen=True)
class Verdict:
    stream_id: int
    agree: bool
    checked_tokens: int
    first_difference: int | None  # first token that differs (from the closest candidate)
    at: float = 0.0

    def describe(self) -> str:
        if self.agree:
            return f"stream {self.stream_id}: {self.checked_tokens} tokens agree"
        return (
            f"stream {self.stream_id}: token {self.first_difference} differs from the strong"
            f" model's own output for the same prompt, parameters and seed"
        )


@dataclass(frozen=True)
class Speculation:
    """How the inner drafted (`inner.draft_tokens` > 0): a re-run drafts the same way."""

    drafter: LanguageModel  # the inner's weak model
    config: SchedulerConfig  # the inner's scheduler configuration, draft_tokens included


def verify(
    model: LanguageModel,
    job: CheckJob,
    *,
    max_context: int = 4096,
    speculation: Speculation | None = None,
    weak: LanguageModel | None = None,
) -> Verdict:
    """Regenerate the stream's candidates as far as the served tokens go and compare (in this
    process): it agrees if the served tokens are a prefix of a candidate."""
    spec, served = job.spec, job.tokens
    if speculation is None:
        n = len(served)  # plain decoding: max_tokens only cuts, so stopping early is exact
        count = 1 if spec.params.greedy else job.best_of  # as the scheduler does
        seeds = [candidate_seed(spec.seed, j) for j in range(count)]
        reqs = [Request(spec.prompt, spec.params, seed, n) for seed in seeds]
        gens, _ = generate(model, reqs, max_context=max_context, weak=weak)
        candidates = [g.tokens for g in gens]
    else:
        candidates = _rerun_speculative(model, speculation, job)
    agreeing = max(common_prefix(served, c) for c in candidates)
    if agreeing == len(served):
        return Verdict(spec.stream_id, True, len(served), None, time.time())
    return Verdict(spec.stream_id, False, len(served), agreeing, time.time())


def _rerun_speculative(strong: LanguageModel, s: Speculation, job: CheckJob) -> list[list[int]]:
    """The candidates as the inner's scheduler generates them with drafts. The request keeps
    its max_tokens: how many drafts a step makes depends on the room left, and the drafts
    decide how the strong evaluation is cut into calls (docs/serving.md)."""
    scheduler = Scheduler(strong, s.config, drafter=s.drafter, guide=s.drafter)
    sid = job.spec.stream_id
    try:
        scheduler.submit(GenerationRequest(job.spec, "spotcheck", best_of=job.best_of))
        while scheduler.step():
            if all(len(c) >= len(job.tokens) for c in scheduler.candidate_tokens(sid)):
                break  # the rest cannot change what is compared
        return scheduler.candidate_tokens(sid)
    finally:
        scheduler.close()


def _worker(ref: str, backend: str | None, options: dict, jobs: mp.Queue, out: mp.Queue) -> None:
    from uplimit.models.loading import load_model

    model = load_model(ref, backend=backend, **options)  # type: ignore[arg-type]
    try:
        out.put("ready")
        while (job := jobs.get()) is not None:
            try:
                out.put(verify(model, job))
            except Exception as e:  # a job that cannot be checked is reported, never dropped
                out.put(Verdict(job.spec.stream_id, False, len(job.tokens), None, time.time()))
                out.put(f"error: stream {job.spec.stream_id}: {e!r}")
    finally:
        model.close()


class SpotChecker:
    """A verifier process with its own strong model; checks a random `rate` of streams.

    `offer(job)` decides (with the OS's randomness, which the inner cannot predict) whether to
    check the stream, and queues it; `verdicts()` collects what the process has answered.
    """

    def __init__(
        self,
        strong_ref: str,
        *,
        rate: float = 1.0,
        backend: str | None = None,
        options: dict | None = None,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"rate must be in [0, 1], got {rate}")
        self.rate = rate
        ctx = mp.get_context("spawn")  # its own interpreter and model, nothing shared
        self._jobs: mp.Queue = ctx.Queue()
        self._out: mp.Queue = ctx.Queue()
        self._proc = ctx.Process(
            target=_worker,
            args=(strong_ref, backend, options or {}, self._jobs, self._out),
            name="uplimit-spotcheck",
            daemon=True,
        )
        self._proc.start()  # loads its model while the caller goes on; jobs queue meanwhile
        self.offered = self.queued = 0
        self._verdicts: list[Verdict] = []
        self.errors: list[str] = []

    def offer(self, job: CheckJob) -> bool:
        self.offered += 1
        if not pick(self.rate):
            return False
        self._jobs.put(job)
        self.queued += 1
        return True

    def verdicts(self, *, wait_s: float = 0.0) -> list[Verdict]:
        """Every verdict so far; waits up to `wait_s` for the queued ones to come in."""
        deadline = time.monotonic() + wait_s
        while len(self._verdicts) < self.queued:
            try:
                item = self._out.get(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if not self._proc.is_alive():
                    raise BackendError(
                        f"the spot-check process died (exit {self._proc.exitcode})"
                    ) from None
                if time.monotonic() >= deadline:
                    break
                continue
            if isinstance(item, Verdict):
                self._verdicts.append(item)
            elif item != "ready":
                self.errors.append(str(item))
        return list(self._verdicts)

    @property
    def disagreements(self) -> list[Verdict]:
        return [v for v in self._verdicts if not v.agree]

    def close(self) -> None:
        self._jobs.put(None)
        self._proc.join(timeout=5)  # it only has to free its model
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
