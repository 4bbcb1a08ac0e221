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
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import secrets
import time
from dataclasses import dataclass

from uplimit.errors import BackendError, ConfigError
from uplimit.inner.generate import Request, generate
from uplimit.models.base import LanguageModel
from uplimit.wire.streams import StreamSpec

__all__ = ["CheckJob", "SpotChecker", "Verdict", "verify"]


@dataclass(frozen=True)
class CheckJob:
    spec: StreamSpec
    tokens: tuple[int, ...]  # what the outer decoded for the stream


@dataclass(frozen=True)
class Verdict:
    stream_id: int
    agree: bool
    checked_tokens: int
    first_difference: int | None  # index of the first token that differs
    at: float = 0.0

    def describe(self) -> str:
        if self.agree:
            return f"stream {self.stream_id}: {self.checked_tokens} tokens agree"
        return (
            f"stream {self.stream_id}: token {self.first_difference} differs from the strong"
            f" model's own output for the same prompt, parameters and seed"
        )


def verify(model: LanguageModel, job: CheckJob, *, max_context: int = 4096) -> Verdict:
    """Regenerate the stream's first len(tokens) tokens and compare (in this process)."""
    spec, served = job.spec, job.tokens
    if not served:
        return Verdict(spec.stream_id, True, 0, None, time.time())
    n = min(len(served), spec.max_tokens)
    req = Request(tuple(spec.prompt), spec.params, spec.seed, n)
    [gen], _ = generate(model, [req], max_context=max_context)
    expected = gen.tokens
    for i, token in enumerate(served):
        if i >= len(expected) or expected[i] != token:
            return Verdict(spec.stream_id, False, len(served), i, time.time())
    return Verdict(spec.stream_id, True, len(served), None, time.time())


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
        if secrets.randbelow(1 << 30) >= self.rate * (1 << 30):
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
