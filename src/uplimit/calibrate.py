"""`uplimit calibrate`: fit the coder's calibration for a model pair on training prompts.

For each temperature, the strong model answers the training prompts; the weak model is run
along every answer, one token per step as the codec runs it; at every position we record
the decoder's view: its guess's features (`coding.calibration.Features`), whether the guess
hit, and on a miss the cost of the true token under each candidate miss scale. Then
`Calibration` gets, per regime (T = 0 and T > 0), the hit model fitted by logistic
regression and the miss scale with the lowest total cost. Fitting is in floating point: only
its output, a JSON file of integers and a few floats, must be identical on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from uplimit.coding.calibration import Calibration, Features, fit_hit_model
from uplimit.coding.codec import Prediction, StepContext, predict
from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.models.base import LanguageModel
from uplimit.progress import Progress
from uplimit.prompts import Prompt

MISS_SCALES = tuple(round(0.2 * 1.2**i, 4) for i in range(16))  # 0.2 .. 3.1


@dataclass
class Observations:
    """The decoder's view at every position of the training answers, for one regime."""

    features: list[Features] = field(default_factory=list)
    hits: list[bool] = field(default_factory=list)
    miss_costs: list[np.ndarray] = field(default_factory=list)  # bits per MISS_SCALES entry

    def add(self, features: Features, hit: bool, miss_cost: np.ndarray | None) -> None:
        self.features.append(features)
        self.hits.append(hit)
        if miss_cost is not None:
            self.miss_costs.append(miss_cost)


def miss_costs(scores: np.ndarray, guess: int, token: int) -> np.ndarray:
    """-log2 softmax(scale * scores)[token] over all tokens but the guess, for each scale."""
    out = np.empty(len(MISS_SCALES))
    rest = scores.copy()
    rest[guess] = -np.inf
    top = rest.max()
    for i, scale in enumerate(MISS_SCALES):
        x = scale * (rest - top)
        out[i] = (math.log(np.exp(x).sum()) - x[token]) / math.log(2)
    return out


@dataclass(frozen=True)
class Position:
    """One position of one training answer, as the decoder sees it before the token."""

    answer: int  # index of the prompt
    context: tuple[int, ...]  # the prompt and the answer's tokens before this one
    prediction: Prediction
    token: int  # the strong model's token

    @property
    def hit(self) -> bool:
        return self.token == self.prediction.guess


def walk(
    strong: LanguageModel,
    weak: LanguageModel,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    max_tokens: int,
    seed: int,
    progress: Progress,
) -> Iterator[Position]:
    """The strong model answers `prompts`; then the weak model runs along every answer one
    token per step, as the codec runs it, and each position is yielded with the decoder's
    prediction (under uninformed defaults: the guess and its features do not depend on the
    calibration)."""
    requests = [
        Request(tuple(strong.chat_tokens(p.messages)), params, seed + i, max_tokens)
        for i, p in enumerate(prompts)
    ]
    context = max(len(r.prompt) for r in requests) + max_tokens + 1
    label = f"T={params.temperature}"
    gens, _ = generate(
        strong,
        requests,
        max_context=context,
        on_step=lambda n: progress(f"{label}: strong answers", n, len(requests) * max_tokens),
    )
    neutral = Calibration()
    total = sum(len(g.tokens) for g in gens)
    with weak.session(len(requests), context) as session:
        live = {}
        for i, r in enumerate(requests):
            seq, logits = session.prefill(r.prompt)
            live[i] = (seq, logits)
        position = 0
        done = 0
        while live:
            feed = {}
            for i, (seq, logits) in list(live.items()):
                tokens = gens[i].tokens
                ctx = StepContext(params, requests[i].seed, position)
                prediction = predict(logits, ctx, neutral)
                yield Position(
                    i, requests[i].prompt + tuple(tokens[:position]), prediction, tokens[position]
                )
                done += 1
                if position + 1 < len(tokens):
                    feed[seq] = tokens[position]
                else:
                    del live[i]
                    session.drop(seq)
            if feed:
                out = session.step(feed)
                for i, (seq, _) in list(live.items()):
                    live[i] = (seq, out[seq])
            position += 1
            progress(f"{label}: weak model's view", done, total)


def observe(positions: Iterable[Position]) -> Observations:
    obs = Observations()
    for at in positions:
        pred = at.prediction
        obs.add(
            pred.features, at.hit, None if at.hit else miss_costs(pred.scores, pred.guess, at.token)
        )
    return obs


@dataclass(frozen=True)
class FitReport:
    regime: str
    tokens: int
    hit_rate: float
    miss_scale: float
    bits_per_token: float  # on the training data, with the fitted calibration (ideal code)


def observe_regimes(
    strong: LanguageModel,
    weak: LanguageModel,
    prompts: Sequence[Prompt],
    temperatures: Sequence[float],
    max_tokens: int,
    seed: int,
    progress: Progress,
) -> tuple[Observations, Observations]:
    """`observe` at each temperature, merged by regime: (greedy: T = 0, sampled: T > 0)."""
    greedy, sampled = Observations(), Observations()
    for t in temperatures:
        params = SamplingParams(temperature=t)
        obs = observe(walk(strong, weak, prompts, params, max_tokens, seed, progress))
        target = greedy if t == 0 else sampled
        target.features += obs.features
        target.hits += obs.hits
        target.miss_costs += obs.miss_costs
    return greedy, sampled


def fit(
    greedy: Observations, sampled: Observations, note: str
) -> tuple[Calibration, list[FitReport]]:
    models, scales, reports = {}, {}, []
    for regime, obs in (("greedy", greedy), ("sampled", sampled)):
        model = fit_hit_model(obs.features, obs.hits)
        totals = np.sum(obs.miss_costs, axis=0) if obs.miss_costs else np.zeros(len(MISS_SCALES))
        best = int(np.argmin(totals))
        flag_bits = sum(
            -math.log2((c if h else 65536 - c) / 65536)
            for f, h in zip(obs.features, obs.hits, strict=True)
            for c in (model.hit_count(f),)
        )
        n = len(obs.hits)
        models[regime], scales[regime] = model, MISS_SCALES[best]
        reports.append(
            FitReport(regime, n, sum(obs.hits) / max(n, 1), MISS_SCALES[best],
                      (flag_bits + float(totals[best])) / max(n, 1))
        )  # fmt: skip
    calibration = Calibration(
        greedy_hits=models["greedy"],
        greedy_miss_scale=scales["greedy"],
        sampled_hits=models["sampled"],
        sampled_miss_scale=scales["sampled"],
        note=note,
    )
    return calibration, reports
