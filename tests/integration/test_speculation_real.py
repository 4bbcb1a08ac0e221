"""Speculative decoding on the real pair: the output is a deterministic function of the prompt,
seed and draft length, whatever else the scheduler runs alongside, so a verifier can re-run it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from support.marks import slow
from uplimit.coding.sampling import SamplingParams
from uplimit.inner.scheduler import Scheduler, SchedulerConfig
from uplimit.speed import drain
from uplimit.wire.request import GenerationRequest
from uplimit.wire.streams import StreamSpec

pytestmark = pytest.mark.real

PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number.",
    "What does the HTTP status code 404 mean?",
)
MAX_TOKENS = 24
DRAFTS = 3


def _generate(strong, weak, specs, max_batch):
    config = SchedulerConfig(max_batch=max_batch, max_context=256, draft_tokens=DRAFTS)
    sched = Scheduler(strong, config, drafter=weak)
    try:
        for spec in specs:
            sched.submit(GenerationRequest(spec, f"r{spec.stream_id}"))
        while sched.step():
            pass
        return drain(sched, len(specs)), sched.accepted_drafts / sched.drafted_tokens
    finally:
        sched.close()


@pytest.mark.parametrize(
    "t", [pytest.param(0.0, marks=slow("0.7 covers the draft path, 9 s")), 0.7]
)
def test_speculative_output_is_rerunnable(real_strong, real_weak, t):
    specs = [
        StreamSpec(i, tuple(real_strong.chat_tokens([{"role": "user", "content": p}])),
                   SamplingParams(t), 17 + i, MAX_TOKENS)
        for i, p in enumerate(PROMPTS)
    ]  # fmt: skip
    together, acceptance = _generate(real_strong, real_weak, specs, max_batch=2)
    assert all(len(tokens) > 0 for tokens in together)
    assert acceptance > 0.4  # the weak model guesses most of the strong model's tokens
    for i, spec in enumerate(specs):
        (alone,), _ = _generate(real_strong, real_weak, [replace(spec, stream_id=0)], 1)
        assert alone == together[i]
