"""`uplimit calibrate`: fit the coder's calibration for a model pair on training prompts.

For each temperature, the strong model answers the training prompts; the weak model is run
along every answer, one token per step as the codec runs it; at every position we record
the decoder's view: its guess's features (`coding.calibration.Features`), whether the guess
hit, and on a miss the cost of the true token under each candidate miss scale. Then
`Calibration` gets, per regime (T = 0 and T > 0), the hit model fitted by logistic
regression and the miss scale with the lowest total cost. Fitting is in floating point: only
its output, a JSON file of integers and a few floats, must be identical on both sides.

With knob values (`tie_nats` at T = 0, `tilt` at T > 0) the strong model also answers with
each knob on, and each value gets its own hit model and miss scale (`calibration.Steered`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from uplimit.coding.calibration import (
    FLAG_TOTAL,
    Calibration,
    Features,
    HitModel,
    Steered,
    fit_hit_model,
)
from uplimit.coding.codec import Prediction, StepContext, predict
from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams, knob_name
from uplimit.errors import ConfigError
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

    def extend(self, other: Observations) -> None:
        self.features += other.features
        self.hits += other.hits
        self.miss_costs += other.miss_costs


@dataclass(frozen=True)
class Regime:
    """What a hit model is fitted for: T = 0 (`greedy`) or T > 0, and the knob's value
    (`tie_nats` at T = 0, `tilt` at T > 0; 0 is the exact mode)."""

    greedy: bool
    knob: float = 0.0

    def params(self, temperature: float) -> SamplingParams:
        if self.greedy:
            return SamplingParams(temperature, tie_nats=self.knob)
        return SamplingParams(temperature, tilt=self.knob)

    @property
    def name(self) -> str:
        base = "greedy" if self.greedy else "sampled"
        if not self.knob:
            return base
        return f"{base}, {knob_name(self.greedy)} {self.knob:g}"


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
    label = f"T={params.temperature}" + (f", knob {params.knob:g}" if params.guided else "")
    gens, _ = generate(
        strong,
        requests,
        max_context=context,
        on_step=lambda n: progress(f"{label}: strong answers", n, len(requests) * max_tokens),
        weak=weak,  # read only with tie_nats or tilt
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
    *,
    tie_nats: Sequence[float] = (),
    tilts: Sequence[float] = (),
    exact: bool = True,
) -> dict[Regime, Observations]:
    """`observe` at each temperature, and with each knob value it allows, merged by regime.
    With `exact`, the exact regimes (T = 0 and T > 0) are there, empty if no temperature had
    them; without, only the knobs' answers are walked."""
    observed = {Regime(True): Observations(), Regime(False): Observations()} if exact else {}
    for t in temperatures:
        greedy = t == 0
        for knob in ((0.0,) if exact else ()) + tuple(tie_nats if greedy else tilts):
            regime = Regime(greedy, knob)
            walked = walk(strong, weak, prompts, regime.params(t), max_tokens, seed, progress)
            observed.setdefault(regime, Observations()).extend(observe(walked))
    return observed


def flag_bits(model: HitModel, features: Sequence[Features], hits: Sequence[bool]) -> float:
    """What coding the hit flags costs under `model`, in bits (all positions together)."""
    return -sum(
        math.log2((c if hit else FLAG_TOTAL - c) / FLAG_TOTAL)
        for f, hit in zip(features, hits, strict=True)
        for c in (model.hit_count(f),)
    )


def fit_regime(obs: Observations, regime: Regime) -> tuple[HitModel, float, FitReport]:
    """The hit model and the best miss scale for one regime's observations."""
    model = fit_hit_model(obs.features, obs.hits)
    totals = np.sum(obs.miss_costs, axis=0) if obs.miss_costs else np.zeros(len(MISS_SCALES))
    best = int(np.argmin(totals))
    n = len(obs.hits)
    report = FitReport(regime.name, n, sum(obs.hits) / max(n, 1), MISS_SCALES[best],
                       (flag_bits(model, obs.features, obs.hits) + float(totals[best]))
                       / max(n, 1))  # fmt: skip
    return model, MISS_SCALES[best], report


def fit(
    observed: Mapping[Regime, Observations], note: str, onto: Calibration | None = None
) -> tuple[Calibration, list[FitReport]]:
    """The calibration fitted on `observe_regimes`' observations, with a steered hit model for
    each knob value observed. A regime not observed keeps `onto`'s models (the exact regimes
    must then be there, or `onto` given)."""
    fitted = {regime: fit_regime(obs, regime) for regime, obs in observed.items()}
    models = {r: (model, scale) for r, (model, scale, _) in fitted.items()}
    if onto is not None:
        kept = [(Regime(True), onto.greedy_hits, onto.greedy_miss_scale),
                (Regime(False), onto.sampled_hits, onto.sampled_miss_scale)]  # fmt: skip
        kept += [(Regime(True, s.knob), s.hits, s.miss_scale) for s in onto.greedy_steered]
        kept += [(Regime(False, s.knob), s.hits, s.miss_scale) for s in onto.sampled_steered]
        for regime, model, scale in kept:
            models.setdefault(regime, (model, scale))

    def steered(greedy: bool) -> tuple[Steered, ...]:
        knobs = sorted(r.knob for r in models if r.greedy == greedy and r.knob)
        return tuple(Steered(k, *models[Regime(greedy, k)]) for k in knobs)

    if Regime(True) not in models or Regime(False) not in models:
        raise ConfigError(
            "no exact-mode models: observe the exact regimes, or fit onto a calibration"
        )
    greedy_hits, greedy_scale = models[Regime(True)]
    sampled_hits, sampled_scale = models[Regime(False)]
    calibration = Calibration(
        greedy_hits=greedy_hits,
        greedy_miss_scale=greedy_scale,
        sampled_hits=sampled_hits,
        sampled_miss_scale=sampled_scale,
        note=note,
        greedy_steered=steered(True),
        sampled_steered=steered(False),
    )
    order = sorted(fitted, key=lambda r: (not r.greedy, r.knob))
    return calibration, [fitted[r][2] for r in order]
