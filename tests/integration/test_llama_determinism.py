"""The determinism contract on the real models: a sequence's logits are a function of its
own tokens only: across runs, processes, thread counts and batch compositions."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from uplimit.models.base import LanguageModel

PROMPT = "Write a Python function that checks whether a number is prime."
OTHERS = [
    "Explain recursion to a child.",
    "List three sorting algorithms and their complexity, with a short code example for each.",
    "What is 2 + 2?",
    "Translate 'good morning' into French, German, Spanish and Italian.",
    "x" * 300,
    "def fib(n):",
    "Summarise the plot of Hamlet in one paragraph.",
]
STEPS = 12


def greedy_trace(model: LanguageModel, companions: int = 0, join_at: int = 0) -> list[np.ndarray]:
    """Logits of PROMPT's greedy continuation, optionally sharing every step with others.

    Companions join at step `join_at`, and one of them leaves half-way, so that the batch
    composition, the rows' order and the slots in use all change during the trace.
    """
    prompt = model.chat_tokens([{"role": "user", "content": PROMPT}])
    trace = []
    with model.session(max_sequences=1 + companions, max_context=512) as session:
        others: dict[int, int] = {}
        if join_at == 0:
            others = _start(model, session, companions)
        seq, logits = session.prefill(prompt)
        trace.append(logits)
        for step in range(STEPS):
            if step == join_at and join_at > 0:
                others = _start(model, session, companions)
            if step == STEPS // 2 and others:
                leaving = next(iter(others))
                session.drop(leaving)
                del others[leaving]
            feed = {seq: int(np.argmax(logits))} | {o: (step * 7919 + o) % 1000 for o in others}
            logits = session.step(feed)[seq]
            trace.append(logits)
    return trace


def _start(model: LanguageModel, session, count: int) -> dict[int, int]:
    started = {}
    for text in OTHERS[:count]:
        seq, _ = session.prefill(model.chat_tokens([{"role": "user", "content": text}]))
        started[seq] = 0
    return started


def digest(trace: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for logits in trace:
        h.update(np.ascontiguousarray(logits, dtype=np.float32).tobytes())
    return h.hexdigest()


def assert_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert np.array_equal(x, y), f"position {i}: max diff {np.abs(x - y).max()}"


@pytest.fixture(scope="module")
def reference(real_weak):
    return greedy_trace(real_weak)


def test_identical_across_runs(real_weak, reference):
    assert_identical(greedy_trace(real_weak), reference)


@pytest.mark.parametrize(("companions", "join_at"), [(1, 0), (3, 0), (7, 0), (7, 3)])
def test_identical_across_batch_compositions(real_weak, reference, companions, join_at):
    assert_identical(greedy_trace(real_weak, companions, join_at), reference)


def test_identical_across_thread_counts(reference):
    from uplimit.models.loading import load_model

    one_thread = load_model("weak", n_threads=1)
    try:
        assert_identical(greedy_trace(one_thread, companions=3), reference)
    finally:
        one_thread.close()


def test_identical_in_a_separate_process(reference):
    script = (
        "import sys; sys.path[:0] = [{tests!r}]\n"
        "from integration.test_llama_determinism import greedy_trace, digest\n"
        "from uplimit.models.loading import load_model\n"
        "print(digest(greedy_trace(load_model('weak'), companions=2)))\n"
    ).format(tests=str(__import__("pathlib").Path(__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest(reference)


def test_strong_model_is_batch_invariant_too(real_strong):
    alone = greedy_trace(real_strong)
    assert_identical(greedy_trace(real_strong, companions=4, join_at=2), alone)


def test_teacher_forcing_differs_which_is_why_the_interface_forbids_it(real_weak, reference):
    """Evaluating the continuation in one call (what `step` does not allow) changes logits."""
    prompt = real_weak.chat_tokens([{"role": "user", "content": PROMPT}])
    continuation = [int(np.argmax(x)) for x in reference[:-1]]
    with real_weak.session(max_sequences=1, max_context=512) as session:
        _, forced_last = session.prefill(prompt + continuation)
    assert not np.array_equal(forced_last, reference[-1])
    # ...while the greedy choice usually survives, which is why greedy text looks fine.
    assert int(np.argmax(forced_last)) == int(np.argmax(reference[-1]))


def extend_trace(model: LanguageModel, companions: int) -> list[np.ndarray]:
    """Logits of a fixed continuation of PROMPT fed 4 tokens per `extend` call, optionally
    sharing each call with companions that feed 4 tokens (same call) or 3 (a call of their own)."""
    prompt = model.chat_tokens([{"role": "user", "content": PROMPT}])
    continuation = model.tokenize("def is_prime(n):\n    if n < 2:\n        return False\n")[:12]
    trace = []
    with model.session(max_sequences=1 + companions, max_context=512) as session:
        others = _start(model, session, companions)
        seq, _ = session.prefill(prompt)
        for i in range(0, len(continuation), 4):
            feed = {o: [(i * 31 + o + j) % 1000 for j in range(4 - o % 2)] for o in others}
            trace += session.extend({seq: continuation[i : i + 4], **feed})[seq]
    return trace


@pytest.mark.parametrize("model_name", ["real_weak", "real_strong"])
def test_extend_is_batch_invariant(model_name, request):
    """Speculative decoding checks drafts with `extend`: a sequence's logits must not depend on
    the other sequences in the call, whatever their chunk lengths."""
    model = request.getfixturevalue(model_name)
    assert_identical(extend_trace(model, companions=3), extend_trace(model, companions=0))


def test_extend_by_one_token_is_step(real_weak, reference):
    prompt = real_weak.chat_tokens([{"role": "user", "content": PROMPT}])
    with real_weak.session(max_sequences=2, max_context=512) as session:
        _start(real_weak, session, 1)
        seq, logits = session.prefill(prompt)
        trace = [logits]
        for _ in range(STEPS):
            (logits,) = session.extend({seq: [int(np.argmax(logits))]})[seq]
            trace.append(logits)
    assert_identical(trace, reference)
