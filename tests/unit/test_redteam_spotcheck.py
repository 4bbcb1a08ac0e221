"""Spot-check verification (inner/spotcheck.py) on the tiny pair: honest streams agree with a
re-run, a changed token is caught where it was changed, and the verifier runs in its own
process with its own copy of the strong model."""

from __future__ import annotations

from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.inner.spotcheck import SpotChecker, verify
from uplimit.wire.checks import CheckJob
from uplimit.wire.streams import StreamSpec


def _served(model, temperature, seed=11, max_tokens=12):
    prompt = tuple(model.tokenize("def add(a, b):"))
    params = SamplingParams(temperature=temperature)
    [gen], _ = generate(model, [Request(prompt, params, seed, max_tokens)])
    return StreamSpec(3, prompt, params, seed, max_tokens), gen.tokens


def test_honest_streams_agree_and_a_changed_token_is_found(tiny_strong):
    for t in (0.0, 0.7):
        spec, tokens = _served(tiny_strong, t)
        assert verify(tiny_strong, CheckJob(spec, tuple(tokens))).agree
        assert verify(tiny_strong, CheckJob(spec, tuple(tokens[:5]))).agree  # a stop: a prefix
        bad = list(tokens)
        bad[4] = (bad[4] + 1) % tiny_strong.info.n_vocab
        v = verify(tiny_strong, CheckJob(spec, tuple(bad)))
        assert not v.agree and v.first_difference == 4
        other_seed = StreamSpec(3, spec.prompt, spec.params, spec.seed + 1, spec.max_tokens)
        if t > 0:  # the seed decides the sample: the same tokens under another seed differ
            assert not verify(tiny_strong, CheckJob(other_seed, tuple(tokens))).agree


def test_the_checker_process(tiny_strong, tiny_pair_dirs, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child's torch: no spinning threads
    spec, tokens = _served(tiny_strong, 0.7)
    bad = (*tokens[:-1], (tokens[-1] + 1) % tiny_strong.info.n_vocab)
    checker = SpotChecker(str(tiny_pair_dirs[0]), backend="hf", rate=1.0)
    try:
        assert checker.offer(CheckJob(spec, tuple(tokens)))
        assert checker.offer(CheckJob(spec, bad))
        verdicts = checker.verdicts(wait_s=600)  # returns as soon as both are in
    finally:
        checker.close()
    assert [v.agree for v in verdicts] == [True, False]
    assert checker.disagreements[0].first_difference == len(tokens) - 1
