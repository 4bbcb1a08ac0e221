"""Compression-aware decoding (tie_nats at T = 0, tilt at T > 0) on the tiny pair: off is
exact, on does what docs/codec.md says, and the round trip stays exact."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from uplimit.bench import BenchSettings, run_bench
from uplimit.coding.calibration import LOG_ODDS_UNIT, Calibration, Steered
from uplimit.coding.codec import StepContext, predict
from uplimit.coding.generate import Request, generate
from uplimit.coding.noise import PositionNoise
from uplimit.coding.sampling import SamplingParams, guided_sample, sample
from uplimit.errors import ConfigError, InvalidRequest
from uplimit.models.chat import Message
from uplimit.prompts import Prompt

QUESTIONS = ["def total(values):", "Sort a list.", "What is a tuple?", "Say hello."]


def _prompts(model) -> list[tuple[int, ...]]:
    return [tuple(model.chat_tokens([{"role": "user", "content": q}])) for q in QUESTIONS]


def _run(strong, weak, params: SamplingParams, max_tokens: int = 24) -> list[list[int]]:
    reqs = [Request(p, params, 100 + i, max_tokens) for i, p in enumerate(_prompts(strong))]
    return [g.tokens for g in generate(strong, reqs, max_context=256, weak=weak)[0]]


def _replay(model, prompt, tokens) -> list[np.ndarray]:
    """The model's logits before each of `tokens`, one token per call (the codec's way)."""
    with model.session(1, 256) as s:
        seq, logits = s.prefill(prompt)
        rows = [logits]
        for t in tokens[:-1]:
            rows.append(s.step({seq: t})[seq])
    return rows


@pytest.mark.parametrize("params", [SamplingParams(0.0), SamplingParams(1.0, top_p=0.9)])
def test_knobs_at_zero_leave_the_strong_models_output(tiny_strong, tiny_weak, params):
    assert not params.guided
    assert _run(tiny_strong, tiny_weak, params) == _run(tiny_strong, None, params)


def test_tie_nats_emits_the_decoders_guess_exactly_where_the_strong_top_is_within_d(
    tiny_strong, tiny_weak
):
    d = 3.0
    params = SamplingParams(0.0, tie_nats=d)
    calibration = Calibration()
    steered = 0
    for prompt, tokens in zip(
        _prompts(tiny_strong), _run(tiny_strong, tiny_weak, params), strict=True
    ):
        strong_rows = _replay(tiny_strong, prompt, tokens)
        weak_rows = _replay(tiny_weak, prompt, tokens)
        for pos, (token, s, w) in enumerate(zip(tokens, strong_rows, weak_rows, strict=True)):
            guess = predict(w, StepContext(params, 0, pos), calibration).guess  # the decoder's
            top = int(np.argmax(s))
            expected = guess if s[top] - s[guess] <= d else top
            assert token == expected, f"position {pos}"
            steered += token != top
    assert steered > 0, "the knob never changed a token: the test shows nothing"


def test_tilt_one_samples_the_weak_distribution_and_half_the_geometric_mean(tiny_logits):
    """p^(1-L) q^L, renormalised, with Gumbel-max: chi-square against the exact law."""
    from scipy.stats import chi2

    # Flattened (as in test_codec) so that many tokens have mass a chi-square test can see;
    # the tiny weak model is too close to the strong one to tell p from q, so q is permuted.
    strong = tiny_logits[0] * np.float32(0.2)
    weak = np.random.default_rng(0).permutation(tiny_logits[1] * np.float32(0.2))
    draws = 6_000
    for tilt in (1.0, 0.5):
        params = SamplingParams(1.0, tilt=tilt)
        counts = np.zeros(strong.size)
        for seed in range(draws):
            noise = PositionNoise.draw(seed, 0, strong.size)
            counts[guided_sample(strong, weak, params, noise)] += 1
        x = (1 - tilt) * strong.astype(np.float64) + tilt * weak.astype(np.float64)
        p = np.exp(x - x.max())
        p /= p.sum()
        big = p * draws >= 5  # pool the tail into one cell
        observed = np.append(counts[big], counts[~big].sum())
        expected = np.append(p[big], p[~big].sum()) * draws
        stat = ((observed - expected) ** 2 / expected).sum()
        assert chi2.sf(stat, observed.size - 1) > 1e-4, f"tilt {tilt}"
    # tilt 1 is the decoder's guess itself, token for token (same noise)
    params = SamplingParams(1.0, tilt=1.0)
    for seed in range(200):
        noise = PositionNoise.draw(seed, 3, strong.size)
        pred = predict(weak, StepContext(params, seed, 3), Calibration(), noise)
        assert (
            guided_sample(strong, weak, params, noise) == pred.guess == sample(weak, params, noise)
        )


@pytest.fixture(scope="module")
def tiny_logits(tiny_strong, tiny_weak):
    prompt = _prompts(tiny_strong)[0]
    with tiny_strong.session(1, 256) as s, tiny_weak.session(1, 256) as w:
        return s.prefill(prompt)[1], w.prefill(prompt)[1]


@pytest.fixture(scope="module")
def decoder_weak(tiny_pair_dirs):
    from uplimit.models.hf import HFModel

    model = HFModel(tiny_pair_dirs[1])  # the decoder's own instance
    yield model
    model.close()


@pytest.mark.parametrize(
    ("exact", "knob"),
    [
        (SamplingParams(0.0), SamplingParams(0.0, tie_nats=3.0)),
        (SamplingParams(1.0, top_p=0.9), SamplingParams(1.0, top_p=0.9, tilt=0.5)),
    ],
    ids=["tie_nats", "tilt"],
)
def test_round_trip_is_exact_with_knobs_on_and_they_save_bits(
    tiny_strong, tiny_weak, decoder_weak, exact, knob
):
    prompts = [Prompt(str(i), (Message(role="user", content=q),)) for i, q in enumerate(QUESTIONS)]
    results = {}
    for params in (exact, knob):
        settings = BenchSettings(params, max_tokens=24, frame_tokens=8)
        r = run_bench(prompts, settings, tiny_strong, tiny_weak, decoder_weak, Calibration())
        assert r["exact_roundtrip"] and r["mismatches"] == 0
        results[params.guided] = r
    assert results[False]["steered_share"] == 0.0
    assert results[True]["steered_share"] > 0.0
    assert results[True]["top1_agreement"] > results[False]["top1_agreement"]
    assert results[True]["payload_bits_per_token"] < results[False]["payload_bits_per_token"]
    assert (results[True]["settings"]["tie_nats"], results[True]["settings"]["tilt"]) == (
        knob.tie_nats,
        knob.tilt,
    )
    # With a hit model fitted for steered streams both sides switch to it for this knob:
    # still exact, and priced differently.
    base = Calibration()
    confident = replace(base.greedy_hits, bias=base.greedy_hits.bias + 4 * LOG_ODDS_UNIT)
    steered = (Steered(knob.knob, confident, 0.8),)
    with_steered = replace(base, greedy_steered=steered, sampled_steered=steered)
    settings = BenchSettings(knob, max_tokens=24, frame_tokens=8)
    r = run_bench(prompts, settings, tiny_strong, tiny_weak, decoder_weak, with_steered)
    assert r["exact_roundtrip"] and r["mismatches"] == 0
    assert r["payload_bits_per_token"] != results[True]["payload_bits_per_token"]


def test_knobs_are_validated_and_need_the_weak_model(tiny_strong):
    for bad in (
        {"temperature": 0.0, "tie_nats": -0.5},
        {"temperature": 0.0, "tie_nats": 10.5},
        {"temperature": 0.0, "tie_nats": float("nan")},
        {"temperature": 0.7, "tie_nats": 1.0},  # tie_nats is for T = 0
        {"temperature": 0.7, "tilt": 1.5},
        {"temperature": 0.7, "tilt": float("inf")},
        {"temperature": 0.0, "tilt": 0.5},  # tilt is for T > 0
    ):
        with pytest.raises(InvalidRequest):
            SamplingParams(**bad)
    with pytest.raises(ConfigError, match="needs the weak model"):
        _run(tiny_strong, None, SamplingParams(0.0, tie_nats=1.0))
    from uplimit.outer.app import ApiSettings

    for bad in ({"tie_nats": 10.5}, {"tilt": -0.1}, {"tilt": float("nan")}):
        with pytest.raises(ConfigError, match=r"\[coding\]"):  # the server's defaults too
            ApiSettings(**bad)
    assert ApiSettings(tie_nats=2.0, tilt=0.5).tie_nats == 2.0


def test_the_spot_check_reruns_guided_streams_with_the_weak_model(tiny_strong, tiny_weak):
    from uplimit.inner.spotcheck import verify
    from uplimit.wire.checks import CheckJob
    from uplimit.wire.streams import StreamSpec

    params = SamplingParams(0.0, tie_nats=3.0)
    served = _run(tiny_strong, tiny_weak, params)[0]
    spec = StreamSpec(0, _prompts(tiny_strong)[0], params, 100, 24)
    assert verify(tiny_strong, CheckJob(spec, tuple(served)), weak=tiny_weak).agree
    exact = _run(tiny_strong, None, SamplingParams(0.0))[0]
    assert exact != served  # so the check below can tell them apart
    verdict = verify(tiny_strong, CheckJob(spec, tuple(exact)), weak=tiny_weak)
    assert not verdict.agree  # the strong model's own greedy text is not what was asked for
    with pytest.raises(ConfigError, match="needs the weak model"):  # an error, never a pass
        verify(tiny_strong, CheckJob(spec, tuple(served)))
