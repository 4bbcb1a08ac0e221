"""Spot-check verification (inner/spotcheck.py) on the tiny pair: honest streams agree with a
re-run, and a changed token is caught where it was changed (the checker's own process:
tests/integration/test_spotcheck_process.py)."""

from __future__ import annotations

from support.served import served
from uplimit.inner.spotcheck import verify
from uplimit.wire.checks import CheckJob
from uplimit.wire.streams import StreamSpec


def test_honest_streams_agree_and_a_changed_token_is_found(tiny_strong):
    for t in (0.0, 0.7):
        spec, tokens = served(tiny_strong, t)
        assert verify(tiny_strong, CheckJob(spec, tuple(tokens))).agree
        assert verify(tiny_strong, CheckJob(spec, tuple(tokens[:5]))).agree  # a stop: a prefix
        bad = list(tokens)
        bad[4] = (bad[4] + 1) % tiny_strong.info.n_vocab
        v = verify(tiny_strong, CheckJob(spec, tuple(bad)))
        assert not v.agree and v.first_difference == 4
        other_seed = StreamSpec(3, spec.prompt, spec.params, spec.seed + 1, spec.max_tokens)
        if t > 0:  # the seed decides the sample: the same tokens under another seed differ
            assert not verify(tiny_strong, CheckJob(other_seed, tuple(tokens))).agree
