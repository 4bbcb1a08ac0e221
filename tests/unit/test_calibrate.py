"""`uplimit calibrate`'s pipeline on the tiny pair: the walk sees what the codec sees, the
fitted calibration prices the training answers no worse than uninformed defaults, and hit
models fitted with a knob on are the ones the codec uses for streams with that knob."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uplimit.calibrate import Regime, fit, observe, observe_regimes, walk
from uplimit.coding.calibration import Calibration, Steered
from uplimit.coding.codec import Prediction, StepContext, cost_bits, predict
from uplimit.coding.sampling import SamplingParams
from uplimit.errors import ConfigError
from uplimit.models.chat import Message
from uplimit.prompts import Prompt

PROMPTS = [
    Prompt(f"p{i}", (Message(role="user", content=text),))
    for i, text in enumerate(("def add(a, b):", "Sort a list in Python.", "What is a tuple?"))
]


def _silent(*_: object) -> None:
    pass


def test_the_walk_yields_every_position_with_the_codecs_prediction(tiny_strong, tiny_weak):
    params = SamplingParams(temperature=1.0)
    positions = list(walk(tiny_strong, tiny_weak, PROMPTS, params, 6, 5, _silent))
    by_answer: dict[int, list] = {}
    for at in positions:
        by_answer.setdefault(at.answer, []).append(at)
    assert sorted(by_answer) == [0, 1, 2]
    for answer, seen in by_answer.items():
        prompt = tuple(tiny_strong.chat_tokens(PROMPTS[answer].messages))
        tokens = [at.token for at in seen]
        for position, at in enumerate(seen):
            assert at.context == prompt + tuple(tokens[:position])
        # the decoder's own prediction at the last position, from a fresh weak session fed
        # as the codec feeds it: the prompt in one call, then one token per call
        with tiny_weak.session(1, 64) as session:
            seq, logits = session.prefill(prompt)
            for token in tokens[:-1]:
                logits = session.step({seq: token})[seq]
        again = predict(logits, StepContext(params, 5 + answer, len(seen) - 1), Calibration())
        assert (again.guess, again.features) == (at.prediction.guess, at.prediction.features)


def test_the_fit_prices_its_training_answers_no_worse_than_the_defaults(tiny_strong, tiny_weak):
    observed = observe_regimes(tiny_strong, tiny_weak, PROMPTS, [0.0, 1.0], 12, 3, _silent)
    calibration, reports = fit(observed, "test")
    assert Calibration.from_json(calibration.to_json()) == calibration
    assert [r.regime for r in reports] == ["greedy", "sampled"]
    assert reports[0].tokens == len(observed[Regime(True)].hits) > 0
    assert calibration.greedy_steered == calibration.sampled_steered == ()
    for t in (0.0, 1.0):
        params = SamplingParams(temperature=t)
        positions = list(walk(tiny_strong, tiny_weak, PROMPTS, params, 12, 3, _silent))
        fitted = sum(
            cost_bits(_priced(at.prediction, calibration, params), at.token) for at in positions
        )
        default = sum(
            cost_bits(_priced(at.prediction, Calibration(), params), at.token) for at in positions
        )
        assert math.isfinite(fitted) and fitted <= default
    assert len(observe(iter([])).hits) == 0


def _priced(pred: Prediction, calibration: Calibration, params: SamplingParams) -> Prediction:
    """The prediction as `calibration` prices it (the guess and scores do not depend on it)."""
    model, scale = calibration.regime(params.greedy, params.knob)
    return Prediction(pred.guess, pred.features, model.hit_count(pred.features), pred.scores, scale)


def test_steered_hit_models_are_fitted_per_knob_and_coded_with_for_those_streams(
    tiny_strong, tiny_weak
):
    observed = observe_regimes(
        tiny_strong, tiny_weak, PROMPTS, [0.0, 1.0], 12, 3, _silent, tie_nats=[2.0], tilts=[0.5]
    )
    calibration, reports = fit(observed, "test")
    names = ["greedy", "greedy, tie_nats 2", "sampled", "sampled, tilt 0.5"]
    assert [r.regime for r in reports] == names
    assert [s.knob for s in calibration.greedy_steered] == [2.0]
    assert [s.knob for s in calibration.sampled_steered] == [0.5]
    again = Calibration.from_json(calibration.to_json())
    assert again == calibration and again.digest() == calibration.digest()
    exact = Calibration(
        calibration.greedy_hits, calibration.greedy_miss_scale,
        calibration.sampled_hits, calibration.sampled_miss_scale, "test",
    )  # fmt: skip
    assert exact.digest() != calibration.digest()  # both sides must hold the same models

    # the codec codes a stream with the steered model of the largest knob not above its own
    steered = calibration.greedy_steered[0]
    assert steered.hits != calibration.greedy_hits
    base = (calibration.greedy_hits, calibration.greedy_miss_scale)
    logits = np.random.default_rng(0).normal(0, 3, tiny_weak.info.n_vocab).astype(np.float32)
    coded = []
    for knob, (want, scale) in ((0.0, base), (1.0, base), (2.0, (steered.hits, steered.miss_scale)),
                                (5.0, (steered.hits, steered.miss_scale))):  # fmt: skip
        ctx = StepContext(SamplingParams(0.0, tie_nats=knob), 3, 0)
        pred = predict(logits, ctx, calibration)
        assert (pred.hit_count, pred.miss_scale) == (want.hit_count(pred.features), scale)
        coded.append((pred.hit_count, pred.miss_scale))
    assert coded[1] != coded[2]  # the two models price this position differently
    # the tie_nats = 2 answers, priced by the model fitted on them and by the defaults
    params = SamplingParams(0.0, tie_nats=2.0)
    positions = list(walk(tiny_strong, tiny_weak, PROMPTS, params, 12, 3, _silent))
    fitted = sum(cost_bits(_priced(at.prediction, calibration, params), at.token)
                 for at in positions)  # fmt: skip
    default = sum(cost_bits(_priced(at.prediction, Calibration(), params), at.token)
                  for at in positions)  # fmt: skip
    assert math.isfinite(fitted) and fitted <= default


def test_steered_models_are_validated():
    model = Calibration().greedy_hits
    with pytest.raises(ConfigError, match="knob must be > 0"):
        Steered(0.0, model, 1.0)
    with pytest.raises(ConfigError, match="miss scale"):
        Steered(1.0, model, 0.0)
    with pytest.raises(ConfigError, match="strictly increasing"):
        Calibration(greedy_steered=(Steered(2.0, model, 1.0), Steered(1.0, model, 1.0)))
    text = Calibration(sampled_steered=(Steered(0.5, model, 1.0),)).to_json()
    with pytest.raises(ConfigError, match="invalid calibration"):
        Calibration.from_json(text.replace('"knob": 0.5', '"knob": "half"'))
    with pytest.raises(ConfigError, match="invalid calibration"):
        Calibration.from_json(text.replace('"sampled_steered": [', '"sampled_steered": [7, '))


def test_calibrate_refuses_a_knob_without_its_temperature(tmp_path):
    from typer.testing import CliRunner

    from uplimit.cli import app

    out = tmp_path / "c.json"
    for args in (["--temperatures", "1.0", "--tie-nats", "1"],
                 ["--temperatures", "0", "--tilt", "0.5"],
                 ["--temperatures", "0", "--tie-nats", "-1"],
                 ["--temperatures", "0", "--tie-nats", "one"]):  # fmt: skip
        result = CliRunner().invoke(app, ["calibrate", "--out", str(out), *args])
        assert result.exit_code == 2, (args, result.output)
    assert not out.exists()


def test_steered_models_fitted_onto_a_calibration_keep_its_exact_ones(tiny_strong, tiny_weak):
    model = Calibration().greedy_hits
    base = Calibration(
        greedy_miss_scale=1.5, note="base", greedy_steered=(Steered(1.0, model, 0.9),),
        sampled_steered=(Steered(0.5, model, 0.7),),
    )  # fmt: skip
    observed = observe_regimes(
        tiny_strong, tiny_weak, PROMPTS, [0.0], 12, 3, _silent, tie_nats=[2.0], exact=False
    )
    assert list(observed) == [Regime(True, 2.0)]  # the exact answers were not walked
    calibration, reports = fit(observed, "more", onto=base)
    assert [r.regime for r in reports] == ["greedy, tie_nats 2"]
    assert (calibration.greedy_hits, calibration.greedy_miss_scale) == (model, 1.5)
    assert calibration.sampled_hits == base.sampled_hits
    assert [s.knob for s in calibration.greedy_steered] == [1.0, 2.0]
    assert calibration.greedy_steered[0] == base.greedy_steered[0]
    assert calibration.sampled_steered == base.sampled_steered
    with pytest.raises(ConfigError, match="no exact-mode models"):
        fit(observed, "alone")
