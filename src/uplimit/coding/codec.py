"""Code one strong-model token against the weak model: guess, flag, and on a miss the token.

Both sides call `predict` on the same weak logits with the same step context, so they hold
the same `Prediction`:
- T = 0: the guess is the weak model's argmax (the strong model emitted its own argmax);
- T > 0: the guess is argmax over the weak support of (weak logits / T + g), with g the
  Gumbel noise that the inner side also used to sample the strong token. When the two
  models agree closely the same noise picks the same token, so most guesses hit.
Then one binary symbol says hit or miss (probability from the calibration, a function of
how robust the guess is), and a miss codes the token under softmax(scale * scores) with the
guess removed. Cost = -log2 of the coded probabilities, which `TokenCost` reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from uplimit.coding.arith import ArithmeticDecoder, ArithmeticEncoder
from uplimit.coding.calibration import FLAG_BITS, FLAG_TOTAL, Calibration, Features
from uplimit.coding.freqs import FrequencyTable
from uplimit.coding.noise import EULER_GAMMA, PositionNoise
from uplimit.coding.sampling import SamplingParams, support


@dataclass(frozen=True)
class StepContext:
    """What both sides know about one position of one stream before its token is coded."""

    params: SamplingParams
    seed: int
    position: int  # index of the token among the generated ones (0 = first)

    def noise(self, n_vocab: int) -> PositionNoise | None:
        if self.params.greedy:
            return None
        return PositionNoise.draw(self.seed, self.position, n_vocab)


@dataclass(frozen=True)
class Prediction:
    guess: int
    features: Features  # how robust the guess is: what the hit probability is a function of
    hit_count: int  # P(hit) = hit_count / 2**16
    scores: npt.NDArray[np.float64]  # miss distribution = softmax(miss_scale * scores)
    miss_scale: float

    def miss_table(self) -> FrequencyTable:
        mask = np.zeros(self.scores.size, dtype=np.bool_)
        mask[self.guess] = True
        return FrequencyTable.from_logits(self.scores, inv_temperature=self.miss_scale, mask=mask)


def predict(
    weak_logits: npt.NDArray[np.float32],
    ctx: StepContext,
    calibration: Calibration,
    noise: PositionNoise | None = None,
) -> Prediction:
    """The decoder's guess and coding distributions; `noise` may be passed if already drawn.

    At T > 0 the scores are x + g for the tokens whose noise was drawn (every token that
    could have won) and x + E[g] for the rest: a coding distribution only has to be the same
    on both sides, and drawing g for every token would cost more than the model step.
    """
    if ctx.params.greedy:
        scores = weak_logits.astype(np.float64)
        guess = int(np.argmax(scores))
    else:
        if noise is None:
            noise = PositionNoise.draw(ctx.seed, ctx.position, weak_logits.size)
        x = weak_logits.astype(np.float64) / ctx.params.temperature
        guess, drawn, g = noise.perturbed_argmax(x, support(weak_logits, ctx.params))
        scores = x + EULER_GAMMA
        scores[drawn] = x[drawn] + g
    model, scale = calibration.regime(ctx.params.greedy, ctx.params.knob)
    features = robustness(scores, guess)
    return Prediction(guess, features, model.hit_count(features), scores, scale)


CONFIDENCE_NATS = 20.0


def robustness(scores: npt.NDArray[np.float64], guess: int) -> Features:
    """The hit model's features of `guess` under `scores` (restored before returning)."""
    best = scores[guess]
    scores[guess] = -np.inf
    second = int(np.argmax(scores))
    runner_up = scores[second]
    scores[second] = -np.inf
    third = scores.max()
    scores[second] = runner_up
    scores[guess] = best
    # The guess's probability among the tokens within CONFIDENCE_NATS of it: the rest would
    # move it by under 152k * e**-20 = 3e-4, and a table of the whole vocabulary costs 1 ms.
    near = np.flatnonzero(scores >= best - CONFIDENCE_NATS)
    table = FrequencyTable.from_logits(scores[near])
    at = int(np.searchsorted(near, guess))
    confidence = (int(table.counts[at]) << FLAG_BITS) // table.total
    return Features(float(best - runner_up), float(runner_up - third), confidence)


@dataclass(frozen=True)
class TokenCost:
    bits: float
    hit: bool


def cost_bits(pred: Prediction, token: int) -> float:
    """What coding `token` costs under `pred`: -log2 of the probabilities coded."""
    if token == pred.guess:
        return FLAG_BITS - math.log2(pred.hit_count)
    table = pred.miss_table()
    return FLAG_BITS - math.log2(FLAG_TOTAL - pred.hit_count) + table.cost_bits(token)


def encode_token(enc: ArithmeticEncoder, token: int, pred: Prediction) -> TokenCost:
    hit = token == pred.guess
    if hit:
        enc.encode(0, pred.hit_count, FLAG_TOTAL)
        return TokenCost(FLAG_BITS - math.log2(pred.hit_count), True)
    enc.encode(pred.hit_count, FLAG_TOTAL - pred.hit_count, FLAG_TOTAL)
    table = pred.miss_table()
    low, freq = table.interval(token)
    enc.encode(low, freq, table.total)
    flag_bits = FLAG_BITS - math.log2(FLAG_TOTAL - pred.hit_count)
    return TokenCost(flag_bits + table.cost_bits(token), False)


def decode_token(dec: ArithmeticDecoder, pred: Prediction) -> int:
    if dec.decode_target(FLAG_TOTAL) < pred.hit_count:
        dec.consume(0, pred.hit_count, FLAG_TOTAL)
        return pred.guess
    dec.consume(pred.hit_count, FLAG_TOTAL - pred.hit_count, FLAG_TOTAL)
    table = pred.miss_table()
    token = table.symbol_at(dec.decode_target(table.total))
    dec.consume(*table.interval(token), table.total)
    return token


def plain_cost_bits(
    weak_logits: npt.NDArray[np.float32], token: int, params: SamplingParams
) -> float:
    """The seed post's scheme: the token coded under the weak distribution at the same T."""
    inv_t = 1.0 if params.greedy else 1.0 / params.temperature
    return FrequencyTable.from_logits(weak_logits, inv_temperature=inv_t).cost_bits(token)
