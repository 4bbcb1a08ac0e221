"""Batched generation with the strong model: the outer side's seeds decide every sample.

All sequences advance in lock step, one token per sequence per batched call (the
determinism discipline of `models.base`), so a re-run with the same prompts, parameters and
seeds reproduces the same tokens: what makes the inner side's output checkable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from uplimit.coding.codec import StepContext
from uplimit.coding.sampling import SamplingParams, sample
from uplimit.models.base import LanguageModel


class Finish(StrEnum):
    """Why a generation ended, one meaning each, on both sides (the audit store keeps the
    value); `openai` is what the API says."""

    EOS = "eos"  # the model's end-of-sequence token
    LENGTH = "length"  # max_tokens (or the context) reached
    STOP = "stop"  # a stop sequence matched
    CANCELLED = "cancelled"  # the client went away, or the outer cancelled the stream
    ERROR = "error"  # the link or the model failed
    RETRIEVED = "retrieved"  # withheld reasoning uploaded at an operator's request
    REFUSED = "refused"  # the inner refused the stream, the link goes on (`wire.frame.Refusal`)

    @property
    def openai(self) -> str:
        """OpenAI's finish_reason: "stop" when the model or a stop sequence ended the text."""
        return _OPENAI.get(self, self.value)


_OPENAI = {Finish.EOS: "stop", Finish.CANCELLED: "length"}


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    params: SamplingParams
    seed: int
    max_tokens: int


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    finish_reason: Finish | None = None  # EOS or LENGTH once generated


@dataclass
class GenerationTimes:
    model_s: float = 0.0  # inside the model's prefill/step calls
    sampling_s: float = 0.0  # noise and sampling


def generate(
    model: LanguageModel,
    requests: Sequence[Request],
    *,
    max_context: int = 4096,
    on_step: Callable[[int], None] | None = None,
) -> tuple[list[Generation], GenerationTimes]:
    """Generate every request to its end; `on_step(tokens_so_far)` reports progress."""
    out = [Generation() for _ in requests]
    times = GenerationTimes()
    eos = model.info.eos_ids
    with model.session(max_sequences=len(requests), max_context=max_context) as session:
        logits, seq_of = {}, {}
        for i, req in enumerate(requests):
            t0 = time.perf_counter()
            seq_of[i], logits[i] = session.prefill(req.prompt)
            times.model_s += time.perf_counter() - t0
        live = set(range(len(requests)))
        while live:
            t0 = time.perf_counter()
            fed = {}
            for i in sorted(live):
                req, gen = requests[i], out[i]
                ctx = StepContext(req.params, req.seed, len(gen.tokens))
                token = sample(logits[i], req.params, ctx.noise(logits[i].size))
                gen.tokens.append(token)
                if token in eos or len(gen.tokens) >= req.max_tokens:
                    gen.finish_reason = Finish.EOS if token in eos else Finish.LENGTH
                    live.discard(i)
                    session.drop(seq_of[i])
                else:
                    fed[i] = token
            t1 = time.perf_counter()
            times.sampling_s += t1 - t0
            if fed:
                step = session.step({seq_of[i]: t for i, t in fed.items()})
                for i in fed:
                    logits[i] = step[seq_of[i]]
            times.model_s += time.perf_counter() - t1
            if on_step:
                on_step(sum(len(g.tokens) for g in out))
    return out, times
