"""Seeded sampling is exact; the token codec round-trips and costs what it says."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uplimit.coding.arith import ArithmeticDecoder, ArithmeticEncoder
from uplimit.coding.calibration import (
    LOG_ODDS_UNIT,
    Calibration,
    Features,
    Steps,
    fit_hit_model,
    hit_count_of,
)
from uplimit.coding.codec import StepContext, decode_token, encode_token, predict, robustness
from uplimit.coding.freqs import FrequencyTable
from uplimit.coding.noise import TAU, PositionNoise, position_key
from uplimit.coding.sampling import MIN_TEMPERATURE, SamplingParams, sample, support
from uplimit.errors import ConfigError, InvalidRequest


@pytest.fixture(scope="module")
def tiny_logits(tiny_strong, tiny_weak):
    """Next-token logits of both tiny models after a short chat prompt."""
    prompt = tiny_strong.chat_tokens([{"role": "user", "content": "def total(values):"}])
    with tiny_strong.session(1, 256) as s, tiny_weak.session(1, 256) as w:
        return s.prefill(prompt)[1], w.prefill(prompt)[1]


def test_uniforms_are_a_pure_function_of_seed_position_token():
    tokens = np.arange(1000, dtype=np.int64)
    a = PositionNoise.draw(7, 3, 1000).uniforms(tokens)
    assert np.array_equal(a, PositionNoise.draw(7, 3, 1000).uniforms(tokens))
    sub = PositionNoise.draw(7, 3, 1000).uniforms(np.array([5, 900]))
    assert np.array_equal(a[[5, 900]], sub)  # random access
    assert not np.array_equal(a, PositionNoise.draw(7, 4, 1000).uniforms(tokens))
    assert not np.array_equal(a, PositionNoise.draw(8, 3, 1000).uniforms(tokens))
    assert a.min() > 0.0 and a.max() < 1.0


def test_uniforms_look_uniform_and_the_lucky_set_has_the_right_rate():
    n = 151_936
    noise = PositionNoise.draw(12345, 0, n)
    u = noise.uniforms(np.arange(n, dtype=np.int64))
    # Kolmogorov-Smirnov distance: the 0.999 critical value for n=152k is about 0.005
    ks = np.abs(np.sort(u) - (np.arange(n) + 0.5) / n).max()
    assert ks < 0.005
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01
    assert set(np.flatnonzero(u > TAU)) == set(noise.lucky)
    expected = n * (1 - TAU)
    assert abs(noise.lucky.size - expected) < 5 * np.sqrt(expected)
    # the tail beyond TAU is uniform too (it is where the winners come from)
    tail = (u[u > TAU] - TAU) / (1 - TAU)
    assert abs(tail.mean() - 0.5) < 0.05


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0])
def test_lazy_perturbed_argmax_equals_the_full_computation(temperature):
    """Drawing g for a few hundred tokens finds the same winner as drawing all of them."""
    rng = np.random.default_rng(1)
    n = 50_000
    for seed in range(40):
        x = rng.standard_normal(n) * 3 / temperature
        noise = PositionNoise.draw(seed, seed % 7, n)
        full = int(np.argmax(x + noise.gumbel(np.arange(n, dtype=np.int64))))
        winner, drawn, _ = noise.perturbed_argmax(x)
        assert winner == full
        if temperature <= 1.0:  # flat distributions need more draws; peaked ones few
            assert drawn.size < n // 5
        allowed = np.sort(rng.choice(n, 300, replace=False))
        g = noise.gumbel(allowed)
        assert noise.perturbed_argmax(x, allowed)[0] == int(allowed[np.argmax(x[allowed] + g)])


def test_position_keys_reject_bad_input():
    with pytest.raises(ValueError):
        position_key(-1, 0)
    with pytest.raises(ValueError):
        position_key(1 << 64, 0)
    with pytest.raises(ValueError):
        position_key(0, -1)


def _chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """Upper tail of a chi-square test, cells with expected count < 5 pooled."""
    from scipy.stats import chi2

    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    assert keep.sum() >= 3, "too few cells for a meaningful test"
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(chi2.sf(stat, keep.sum() - 1))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.3, top_k=20),
    ],
)
def test_gumbel_max_samples_the_strong_distribution_exactly(tiny_logits, params):
    """Users get exact samples of softmax(logits / T) over the top-k/top-p support."""
    # The tiny model is very sure of itself (p_top ~ 0.99); flattened, its logits give many
    # tokens enough mass for a chi-square test to see a biased sampler.
    logits = (tiny_logits[0] * 0.2).astype(np.float32)
    draws = 20_000
    counts = np.zeros(logits.size)
    for seed in range(draws):
        counts[sample(logits, params, PositionNoise.draw(seed, 0, logits.size))] += 1
    allowed = support(logits, params)
    p = np.exp(logits.astype(np.float64) / params.temperature)
    if allowed is not None:
        p[np.setdiff1d(np.arange(logits.size), allowed)] = 0.0
    p /= p.sum()
    assert counts[p == 0].sum() == 0, "sampled outside the support"
    assert _chi_square_p(counts, p * draws) > 1e-4


def test_support_is_top_k_then_top_p(tiny_logits):
    logits = tiny_logits[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    nucleus = support(logits, SamplingParams(temperature=1.0, top_p=0.5))
    cut = int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1
    assert list(nucleus) == list(order[:cut])
    assert list(support(logits, SamplingParams(temperature=1.0, top_k=3))) == list(order[:3])
    assert support(logits, SamplingParams(temperature=1.0)) is None  # the whole vocabulary


def test_sampling_params_are_validated():
    for bad in ({"temperature": -0.1}, {"temperature": math.nan}, {"temperature": 5e-324},
                {"temperature": 1e-310}, {"temperature": MIN_TEMPERATURE / 2}, {"top_p": 0.0},
                {"top_p": 1.5}, {"top_k": -1}):  # fmt: skip
        with pytest.raises(InvalidRequest):  # a client's input
            SamplingParams(**bad)


def test_the_smallest_temperature_codes_without_overflow(tiny_logits):
    """At MIN_TEMPERATURE logits / T stay finite, so every table can be built (a temperature of
    1e-310 made them infinite, and the inner failed on the first request that asked for it)."""
    params = SamplingParams(temperature=MIN_TEMPERATURE)
    strong, weak = tiny_logits
    for seed in range(20):
        ctx = StepContext(params, seed, 0)
        noise = ctx.noise(weak.size)
        token = sample(strong * 100, params, noise)  # logits far beyond a real model's
        pred = predict(weak * 100, ctx, Calibration(), noise)
        enc = ArithmeticEncoder()
        encode_token(enc, token, pred)
        assert decode_token(ArithmeticDecoder(enc.finish()), pred) == token


@settings(max_examples=25, deadline=None)
@given(
    temperature=st.sampled_from([0.0, 0.5, 1.0, 1.5]),
    top_p=st.sampled_from([1.0, 0.8]),
    seed=st.integers(0, 2**64 - 1),
    tokens=st.lists(st.integers(0, 10_000), min_size=1, max_size=12),
)
def test_token_codec_round_trips_and_costs_what_it_reports(
    tiny_logits, temperature, top_p, seed, tokens
):
    """Random tokens (likely or not), each against the weak logits at its own position."""
    weak = tiny_logits[1]
    params = SamplingParams(temperature=temperature, top_p=top_p)
    calibration = Calibration()
    tokens = [t % weak.size for t in tokens]
    enc = ArithmeticEncoder()
    ideal = 0.0
    for position, token in enumerate(tokens):
        pred = predict(weak, StepContext(params, seed, position), calibration)
        ideal += encode_token(enc, token, pred).bits
    n_bits = enc.n_bits
    data = enc.finish()
    assert n_bits <= ideal * 1.01 + 3 + 7  # termination and padding to a byte
    dec = ArithmeticDecoder(data)
    decoded = [
        decode_token(dec, predict(weak, StepContext(params, seed, p), calibration))
        for p in range(len(tokens))
    ]
    dec.finish()
    assert decoded == tokens


def test_the_hit_models_features_are_what_they_say(tiny_logits):
    """Margin and gap from the sorted scores; confidence is the guess's probability in the
    exact table of the whole vocabulary; the scores are left as they were."""
    for logits in tiny_logits:
        scores = logits.astype(np.float64)
        before = scores.copy()
        guess = int(np.argmax(scores))
        features = robustness(scores, guess)
        assert np.array_equal(scores, before)
        top = np.sort(scores)[::-1]
        assert features.margin == top[0] - top[1]
        assert features.gap == top[1] - top[2]
        whole = FrequencyTable.from_logits(scores)
        exact = int(whole.counts[guess]) * 65536 / whole.total
        assert abs(features.confidence - exact) <= 2  # the tokens 20 nats down move it < 1


def test_coupling_makes_the_weak_guess_hit_when_the_models_agree(tiny_logits):
    """Same logits on both sides: the guess is always the sampled token (cost ~0)."""
    strong = tiny_logits[0]
    params = SamplingParams(temperature=1.0)
    for seed in range(50):
        ctx = StepContext(params, seed, 0)
        noise = ctx.noise(strong.size)
        pred = predict(strong, ctx, Calibration(), noise)
        assert pred.guess == sample(strong, params, noise)


@pytest.mark.parametrize("z", [-40.0, -16.5, -3.0, -0.3, 0.0, 0.7, 2.0, 9.99, 15.9, 40.0])
def test_hit_counts_follow_the_logistic_curve_in_integers(z):
    """2**16 / (1 + 2**-z), to within the table's rounding, never 0 or 2**16, symmetric."""
    units = round(z * LOG_ODDS_UNIT)
    count = hit_count_of(units)
    exact = 65536 / (1 + 2 ** -(units / LOG_ODDS_UNIT))
    assert count == min(65535, max(1, round(exact))) or abs(count - exact) <= 1
    assert 1 <= count <= 65535
    assert abs(count + hit_count_of(-units) - 65536) <= 1 or count in (1, 65535)


def test_hit_counts_rise_with_the_log_odds():
    counts = [hit_count_of(z) for z in range(-20 * LOG_ODDS_UNIT, 20 * LOG_ODDS_UNIT, 97)]
    assert counts == sorted(counts)


def _synthetic_view(rng: np.random.Generator, n: int) -> tuple[list[Features], list[bool]]:
    """Hits that depend on the margin and on the weak model's confidence, not on the gap."""
    margins = rng.uniform(-1, 12, n)
    confidence = rng.integers(0, 65536, n)
    z = margins - 2 + 3 * (confidence / 65536)
    hits = rng.random(n) < 1 / (1 + np.exp(-z))
    gaps = rng.exponential(2.0, n)
    view = [
        Features(float(m), float(g), int(c))
        for m, g, c in zip(margins, gaps, confidence, strict=True)
    ]
    return view, hits.tolist()


def test_fit_hit_model_finds_what_the_hits_depend_on_and_is_never_certain():
    view, hits = _synthetic_view(np.random.default_rng(0), 20_000)
    model = fit_hit_model(view, hits)
    margin, confidence, gap = model.margin.values, model.confidence.values, model.gap.values
    # [10, 13) against [0, 0.25): some 11 nats, 16 bits of odds (no data lies past 12)
    assert margin[-2] - margin[1] > 8 * LOG_ODDS_UNIT
    assert confidence[-1] - confidence[0] > 2 * LOG_ODDS_UNIT  # 3 nats across its range
    assert max(gap) - min(gap) < LOG_ODDS_UNIT  # no effect: the penalty keeps it near flat
    counts = [model.hit_count(f) for f in view]
    assert min(counts) >= 1 and max(counts) <= 65535
    # it predicts better than the hit rate alone, on data it was not fitted on
    test_view, test_hits = _synthetic_view(np.random.default_rng(1), 5000)
    rate = np.mean(test_hits)
    p = np.array([model.hit_count(f) for f in test_view]) / 65536
    y = np.asarray(test_hits)
    fitted_bits = -np.sum(np.where(y, np.log2(p), np.log2(1 - p)))
    flat_bits = -np.sum(np.where(y, np.log2(rate), np.log2(1 - rate)))
    assert fitted_bits < 0.8 * flat_bits


def test_fit_hit_model_with_every_guess_right_stays_codable():
    view, _ = _synthetic_view(np.random.default_rng(2), 300)
    model = fit_hit_model(view, [True] * len(view))
    assert all(1 <= model.hit_count(f) <= 65535 for f in view)
    assert min(model.hit_count(f) for f in view) > 60000


def test_calibration_json_round_trip_and_digest():
    cal = Calibration(greedy_miss_scale=0.8, note="x")
    again = Calibration.from_json(cal.to_json())
    assert again == cal
    assert again.digest() == Calibration(greedy_miss_scale=0.8, note="y").digest()
    assert cal.digest() != Calibration().digest()
    with pytest.raises(ConfigError):
        Calibration.from_json('{"greedy_hits": 1}')
    with pytest.raises(ConfigError, match="uplimit calibrate"):
        Calibration.from_json('{"greedy_flag": {"edges": [], "hit_counts": [1]}}')
    with pytest.raises(ConfigError):
        Steps((1.0, 0.5), (1, 2, 3))
    with pytest.raises(ConfigError):
        Steps((0.5, 1.0), (1, 2))
    with pytest.raises(ConfigError):
        Steps((0.5,), (1, 2.5))
