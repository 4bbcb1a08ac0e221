"""`uplimit calibrate`'s pipeline on the tiny pair: the walk sees what the codec sees, and the
fitted calibration prices the training answers no worse than uninformed defaults."""

from __future__ import annotations

import math

from uplimit.calibrate import fit, observe, observe_regimes, walk
from uplimit.coding.calibration import Calibration
from uplimit.coding.codec import Prediction, StepContext, cost_bits, predict
from uplimit.coding.sampling import SamplingParams
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
    greedy, sampled = observe_regimes(tiny_strong, tiny_weak, PROMPTS, [0.0, 1.0], 12, 3, _silent)
    calibration, reports = fit(greedy, sampled, "test")
    assert Calibration.from_json(calibration.to_json()) == calibration
    assert [r.regime for r in reports] == ["greedy", "sampled"]
    assert reports[0].tokens == len(greedy.hits) > 0
    for t in (0.0, 1.0):
        params = SamplingParams(temperature=t)
        positions = list(walk(tiny_strong, tiny_weak, PROMPTS, params, 12, 3, _silent))
        fitted = sum(
            cost_bits(_priced(at.prediction, calibration, t == 0), at.token) for at in positions
        )
        default = sum(
            cost_bits(_priced(at.prediction, Calibration(), t == 0), at.token) for at in positions
        )
        assert math.isfinite(fitted) and fitted <= default
    assert len(observe(iter([])).hits) == 0


def _priced(pred: Prediction, calibration: Calibration, greedy: bool) -> Prediction:
    """The prediction as `calibration` prices it (the guess and scores do not depend on it)."""
    model, scale = calibration.regime(greedy)
    return Prediction(pred.guess, pred.features, model.hit_count(pred.features), pred.scores, scale)
