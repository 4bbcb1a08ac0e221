"""Batched generation with the strong model: the outer side's seeds decide every sample.

All sequences advance in lock step, one token per sequence per batched call (the
determinism discipline of `models.base`), so a re-run with the same prompts, parameters and
seeds reproduces the same tokens: what makes the inner side's output checkable.

With compression-aware decoding (`SamplingParams.guided`) the weak model runs beside the
strong one, on the same tokens in the same discipline as the decoder (prompt in one call, then
one token per call), so that its logits are the decoder's and its guess the decoder's guess.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from enum import StrEnum

from uplimit.coding.codec import StepContext
from uplimit.coding.sampling import SamplingParams, guided_sample, sample
from uplimit.errors import ConfigError
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
    # Positions where tie_nats or tilt emitted another token than the strong model's own
    # choice there (same context, same noise).
    steered: int = 0


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
    weak: LanguageModel | None = None,
) -> tuple[list[Generation], GenerationTimes]:
    """Generate every request to its end; `on_step(tokens_so_far)` reports progress.

    `weak` (the decoder's weak model) is needed by requests with tie_nats or tilt, and only
    they evaluate it."""
    out = [Generation() for _ in requests]
    times = GenerationTimes()
    eos = model.info.eos_ids
    guided = [i for i, req in enumerate(requests) if req.params.guided]
    if guided and weak is None:
        raise ConfigError("tie_nats or tilt needs the weak model beside the strong one")
    with ExitStack() as stack:
        session = stack.enter_context(model.session(len(requests), max_context))
        logits, seq_of, weak_logits, weak_seq = {}, {}, {}, {}
        if guided:
            weak_session = stack.enter_context(weak.session(len(guided), max_context))
        for i, req in enumerate(requests):
            t0 = time.perf_counter()
            seq_of[i], logits[i] = session.prefill(req.prompt)
            if req.params.guided:
                weak_seq[i], weak_logits[i] = weak_session.prefill(req.prompt)
            times.model_s += time.perf_counter() - t0
        live = set(range(len(requests)))
        while live:
            t0 = time.perf_counter()
            fed = {}
            for i in sorted(live):
                req, gen = requests[i], out[i]
                ctx = StepContext(req.params, req.seed, len(gen.tokens))
                noise = ctx.noise(logits[i].size)
                token = guided_sample(logits[i], weak_logits.get(i), req.params, noise)
                if req.params.guided:
                    gen.steered += token != sample(logits[i], req.params, noise)
                gen.tokens.append(token)
                if token in eos or len(gen.tokens) >= req.max_tokens:
                    gen.finish_reason = Finish.EOS if token in eos else Finish.LENGTH
                    live.discard(i)
                    session.drop(seq_of[i])
                    if i in weak_seq:
                        weak_session.drop(weak_seq[i])
                else:
                    fed[i] = token
            t1 = time.perf_counter()
            times.sampling_s += t1 - t0
            if fed:
                step = session.step({seq_of[i]: t for i, t in fed.items()})
                for i in fed:
                    logits[i] = step[seq_of[i]]
                weak_fed = {weak_seq[i]: t for i, t in fed.items() if i in weak_seq}
                if weak_fed:
                    weak_step = weak_session.step(weak_fed)
                    for i in fed:
                        if i in weak_seq:
                            weak_logits[i] = weak_step[weak_seq[i]]
            times.model_s += time.perf_counter() - t1
            if on_step:
                on_step(sum(len(g.tokens) for g in out))
    return out, times
