"""`uplimit speed`: the inner side's generation throughput with and without the weak model as
the strong model's speculative drafter.

Each run is the inner scheduler alone (no link, no encoder): every prompt is submitted as a
stream and the scheduler steps until all are generated; then its frames are drained to read
the tokens back. Plain and speculative runs alternate (ABBA...) in one process on the same
loaded models, so that load from other work on the machine falls on both alike: the ratio is
the figure to read, not the absolute tokens per second.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from uplimit.bench import stream_seed
from uplimit.coding.sampling import SamplingParams
from uplimit.inner.scheduler import Scheduler, SchedulerConfig
from uplimit.models.base import LanguageModel
from uplimit.prompts import Prompt
from uplimit.wire.request import GenerationRequest
from uplimit.wire.streams import StreamSpec

__all__ = ["SpeedSettings", "drain", "run_speed"]


@dataclass(frozen=True)
class SpeedSettings:
    params: SamplingParams
    max_tokens: int = 64
    max_batch: int = 4  # strong sequences generated at once
    draft_tokens: int = 4  # the speculative runs' drafts per step
    rounds: int = 2  # each round runs both modes, in alternating order
    seed: int = 0


@dataclass
class _Totals:
    tokens: int = 0
    seconds: float = 0.0
    strong_s: float = 0.0
    draft_s: float = 0.0
    drafted: int = 0
    accepted: int = 0
    outputs: list[list[int]] = field(default_factory=list)  # the last run's tokens per stream


def run_speed(
    prompts: Sequence[Prompt], settings: SpeedSettings, strong: LanguageModel, weak: LanguageModel
) -> dict:
    """Alternate plain and speculative runs; returns the JSON-ready result."""
    ids = [tuple(strong.chat_tokens(p.messages)) for p in prompts]
    seeds = [stream_seed(settings.seed, p.id) for p in prompts]
    totals = {0: _Totals(), settings.draft_tokens: _Totals()}
    for r in range(settings.rounds):
        for k in sorted(totals, reverse=r % 2 == 1):
            _run(strong, weak, ids, seeds, settings, k, totals[k])
    plain, spec = totals[0], totals[settings.draft_tokens]
    same = sum(a == b for a, b in zip(plain.outputs, spec.outputs, strict=True))
    return {
        "settings": {**asdict(settings), "params": asdict(settings.params)},
        "prompts": len(prompts),
        "plain": _summary(plain),
        "speculative": _summary(spec),
        "speedup": _rate(spec) / _rate(plain),
        "acceptance": spec.accepted / spec.drafted if spec.drafted else 0.0,
        "tokens_per_strong_call": _calls_ratio(spec),
        "streams_identical_to_plain": same,
    }


def _run(
    strong: LanguageModel,
    weak: LanguageModel,
    ids: Sequence[tuple[int, ...]],
    seeds: Sequence[int],
    settings: SpeedSettings,
    draft_tokens: int,
    totals: _Totals,
) -> None:
    config = SchedulerConfig(
        max_batch=settings.max_batch,
        max_streams=len(ids),
        max_context=max(map(len, ids)) + settings.max_tokens + 1,
        draft_tokens=draft_tokens,
    )
    sched = Scheduler(strong, config, drafter=weak if draft_tokens else None)
    try:
        for i, (prompt, seed) in enumerate(zip(ids, seeds, strict=True)):
            spec = StreamSpec(i, prompt, settings.params, seed, settings.max_tokens)
            sched.submit(GenerationRequest(spec, f"speed-{i}"))
        t0 = time.perf_counter()
        while sched.step():
            pass
        totals.seconds += time.perf_counter() - t0
        totals.tokens += sched.generated_tokens
        totals.strong_s += sched.model_seconds
        totals.draft_s += sched.draft_seconds
        totals.drafted += sched.drafted_tokens
        totals.accepted += sched.accepted_drafts
        totals.outputs = drain(sched, len(ids))
    finally:
        sched.close()


def drain(sched: Scheduler, n: int) -> list[list[int]]:
    """Streams 0..n-1's uploaded tokens, read from the scheduler's frames until it is idle."""
    out: list[list[int]] = [[] for _ in range(n)]
    while not sched.idle:
        frame = sched.take_frame()
        if frame is None:
            continue
        for sid, tokens in frame.content.tokens.items():
            out[sid] += tokens
        for sid in frame.retired:
            sched.release(sid, 0.0)
    return out


def _rate(t: _Totals) -> float:
    return t.tokens / t.seconds


def _calls_ratio(t: _Totals) -> float:
    """Tokens produced per sequence per strong call: 1 without drafts."""
    calls = t.tokens - t.accepted  # each strong evaluation of a sequence yields one own sample
    return t.tokens / calls if calls else 0.0


def _summary(t: _Totals) -> dict:
    return {
        "tokens": t.tokens,
        "seconds": t.seconds,
        "tokens_per_s": _rate(t),
        "strong_s": t.strong_s,
        "draft_s": t.draft_s,
        "drafted": t.drafted,
        "accepted": t.accepted,
    }
