"""The spot-checker in its own process, with its own copy of the strong model."""

from __future__ import annotations

from support.served import served
from uplimit.inner.spotcheck import SpotChecker
from uplimit.wire.checks import CheckJob


def test_the_checker_process(tiny_strong, tiny_pair_dirs, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child's torch: no spinning threads
    spec, tokens = served(tiny_strong, 0.7)
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
