"""How the coder turns the weak model's view into probabilities: fitted, fixed per model pair.

Each token is coded as "was the decoder's guess right?" and, on a miss, which token it was.
- The hit probability is a logistic model of three features the decoder computes from the
  weak model's scores (weak logits at T = 0; weak logits / T plus the shared Gumbel noise at
  T > 0): the guess's margin over the runner-up, the runner-up's gap to the third, and the
  guess's own probability (`Features`). Each adds a fitted step function's value to the
  log-odds, and the sum becomes a count in integers, so both sides agree exactly.
- On a miss the token is coded under softmax(miss_scale * scores) without the guess.
- Compression-aware decoding (`tie_nats`, `tilt`) steers the strong model towards the guess, so
  hits are more frequent than the exact mode's model predicts: a calibration may carry hit
  models fitted with a knob on (`Steered`), each for the streams whose knob is at least its
  value.

The values come from `fit`, run on prompts the benchmark never sees, and are stored as JSON;
their digest is part of the codec fingerprint, since both sides must use the same ones.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from uplimit.coding.freqs import EXP2_TABLE, FRACTION_BITS, WEIGHT_BITS
from uplimit.config import ModelsConfig
from uplimit.errors import ConfigError
from uplimit.models.pins import STRONG

FLAG_BITS = 16  # hit probabilities are multiples of 2**-16
FLAG_TOTAL = 1 << FLAG_BITS
# A hit probability never reaches 0 or 1: both outcomes must stay codable. 2**-16 caps the
# cost of a surprise at 16 bits and the cost of a certain hit at 2e-5 bits.
_MIN_COUNT, _MAX_COUNT = 1, FLAG_TOTAL - 1
LOG_ODDS_UNIT = 1 << FRACTION_BITS  # hit-model weights: log2-odds in units of 2**-12
_MAX_LOG_ODDS = 32 * LOG_ODDS_UNIT  # beyond 32 bits of odds the count is clamped anyway


def hit_count_of(log_odds: int) -> int:
    """round(2**16 / (1 + 2**(-z))) for z = log_odds / 2**12, clamped to [1, 2**16 - 1].

    Integers only, through the frequency tables' exp2 table, so both sides agree exactly.
    """
    a = min(abs(log_odds), _MAX_LOG_ODDS)
    smaller = int(EXP2_TABLE[a & (LOG_ODDS_UNIT - 1)]) >> (a >> FRACTION_BITS)  # 2**30 2**-|z|
    larger = 1 << WEIGHT_BITS
    numerator = larger if log_odds >= 0 else smaller
    denominator = larger + smaller
    count = ((numerator << FLAG_BITS) + (denominator >> 1)) // denominator
    return min(_MAX_COUNT, max(_MIN_COUNT, count))


@dataclass(frozen=True)
class Steps:
    """A step function: `values[i]` on the i-th interval of `edges` (as `bisect_right` counts)."""

    edges: tuple[float, ...]
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        # Floats, so that the digest of a model read back from JSON is the digest written.
        object.__setattr__(self, "edges", tuple(float(e) for e in self.edges))
        if len(self.values) != len(self.edges) + 1:
            raise ConfigError("a step function needs one more value than edges")
        if list(self.edges) != sorted(set(self.edges)) or not all(map(math.isfinite, self.edges)):
            raise ConfigError("step edges must be finite and strictly increasing")
        if not all(type(v) is int and abs(v) <= _MAX_LOG_ODDS for v in self.values):
            raise ConfigError(f"step values must be integers within ±{_MAX_LOG_ODDS}")

    def __call__(self, x: float) -> int:
        return self.values[bisect.bisect_right(self.edges, x)]


# Where each feature's contribution may change (see `Features`).
MARGIN_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 13.0)
GAP_EDGES = (0.5, 1.0, 2.0, 4.0)
_CONFIDENCE_LEVELS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
CONFIDENCE_EDGES = tuple(float(round(p * FLAG_TOTAL)) for p in _CONFIDENCE_LEVELS)


@dataclass(frozen=True)
class Features:
    """What the decoder knows about how robust its guess is, all from the weak model's scores.

    - `margin`: the guess's score minus the runner-up's (nats);
    - `gap`: the runner-up's score minus the third's: a wide gap with a narrow margin means a
      two-way choice, a narrow one a crowd;
    - `confidence`: the guess's probability under softmax(scores) over the tokens within 20
      nats of it, in units of 2**-16, read from the exact integer table (`FrequencyTable`),
      not from a float exp (`codec.robustness`).
    """

    margin: float
    gap: float
    confidence: int


@dataclass(frozen=True)
class HitModel:
    """P(hit) as a logistic model: log2-odds = (bias + the sum of each feature's step) / 2**12.

    Evaluated in integers (`hit_count_of`), so encoder and decoder compute the same count.
    """

    bias: int
    margin: Steps
    gap: Steps
    confidence: Steps

    def hit_count(self, features: Features) -> int:
        return hit_count_of(
            self.bias
            + self.margin(features.margin)
            + self.gap(features.gap)
            + self.confidence(features.confidence)
        )


def _flat(edges: tuple[float, ...]) -> Steps:
    return Steps(edges, (0,) * (len(edges) + 1))


def _uninformed() -> HitModel:
    """Before fitting: log-odds rising with the margin like a logistic curve in nats."""
    margin = tuple(round(m / math.log(2) * LOG_ODDS_UNIT) for m in (-0.5, *MARGIN_EDGES))
    return HitModel(0, Steps(MARGIN_EDGES, margin), _flat(GAP_EDGES), _flat(CONFIDENCE_EDGES))


def _check_miss_scale(scale: float) -> None:
    if not (math.isfinite(scale) and 0.05 <= scale <= 20.0):
        raise ConfigError(f"miss scale must be in [0.05, 20], got {scale}")


@dataclass(frozen=True)
class Steered:
    """The hit model and miss scale fitted on answers steered by a knob set to `knob`
    (`tie_nats` at T = 0, `tilt` at T > 0); used for streams whose knob is at least that."""

    knob: float
    hits: HitModel
    miss_scale: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "knob", float(self.knob))  # the digest of JSON read back
        if not (math.isfinite(self.knob) and self.knob > 0):
            raise ConfigError(f"a steered hit model's knob must be > 0, got {self.knob}")
        _check_miss_scale(self.miss_scale)


@dataclass(frozen=True)
class Calibration:
    greedy_hits: HitModel = field(default_factory=_uninformed)
    greedy_miss_scale: float = 1.0
    sampled_hits: HitModel = field(default_factory=_uninformed)
    sampled_miss_scale: float = 1.0
    note: str = "uninformed defaults"
    greedy_steered: tuple[Steered, ...] = ()  # by increasing knob
    sampled_steered: tuple[Steered, ...] = ()

    def __post_init__(self) -> None:
        for scale in (self.greedy_miss_scale, self.sampled_miss_scale):
            _check_miss_scale(scale)
        for steered in (self.greedy_steered, self.sampled_steered):
            knobs = [s.knob for s in steered]
            if knobs != sorted(set(knobs)):
                raise ConfigError("steered hit models must have strictly increasing knobs")

    def regime(self, greedy: bool, knob: float = 0.0) -> tuple[HitModel, float]:
        """The hit model and miss scale for T = 0 (`greedy`) or T > 0 and a stream's knob
        (`tie_nats` or `tilt`; 0: the exact mode): the steered model with the largest knob
        not above it, else the exact mode's."""
        if greedy:
            chosen, steered = (self.greedy_hits, self.greedy_miss_scale), self.greedy_steered
        else:
            chosen, steered = (self.sampled_hits, self.sampled_miss_scale), self.sampled_steered
        for s in steered:
            if s.knob <= knob:
                chosen = (s.hits, s.miss_scale)
        return chosen

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        try:
            raw = json.loads(text)
            if isinstance(raw, dict) and "greedy_flag" in raw:
                raise ConfigError(
                    "this calibration is in the format before codec version 4 (a step function "
                    "of the margin alone): fit it again with `uplimit calibrate`"
                )
            return cls(
                greedy_hits=_hit_model(raw["greedy_hits"]),
                greedy_miss_scale=float(raw["greedy_miss_scale"]),
                sampled_hits=_hit_model(raw["sampled_hits"]),
                sampled_miss_scale=float(raw["sampled_miss_scale"]),
                note=str(raw.get("note", "")),
                greedy_steered=_steered(raw.get("greedy_steered", [])),
                sampled_steered=_steered(raw.get("sampled_steered", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"invalid calibration: {type(e).__name__}: {e}") from e

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        return cls.from_json(Path(path).read_text())

    def digest(self) -> str:
        """sha256 of what changes coding (not the note). A calibration without steered models
        keeps the digest it had before they existed."""
        data = asdict(self)
        data.pop("note")
        for key in ("greedy_steered", "sampled_steered"):
            if not data[key]:
                data.pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def for_pair(strong_sha256: str, weak_sha256: str) -> Calibration:
    """The calibration shipped for this model pair, or uninformed defaults if none is."""
    name = calibration_name(strong_sha256, weak_sha256)
    shipped = resources.files("uplimit.coding").joinpath("calibrations", name)
    if shipped.is_file():
        return Calibration.from_json(shipped.read_text())
    return Calibration()


def calibration_name(strong_sha256: str, weak_sha256: str) -> str:
    return f"strong-{strong_sha256[:16]}_weak-{weak_sha256[:16]}.json"


def _steps(raw: dict) -> Steps:
    return Steps(tuple(float(e) for e in raw["edges"]), tuple(int(v) for v in raw["values"]))


def _hit_model(raw: dict) -> HitModel:
    return HitModel(
        int(raw["bias"]), _steps(raw["margin"]), _steps(raw["gap"]), _steps(raw["confidence"])
    )


def _steered(raw: list) -> tuple[Steered, ...]:
    return tuple(
        Steered(float(r["knob"]), _hit_model(r["hits"]), float(r["miss_scale"])) for r in raw
    )


def fit_hit_model(features: Sequence[Features], hits: Sequence[bool]) -> HitModel:
    """The hit model that `fit_steps` finds for the three features."""
    bias, steps = fit_steps(
        [
            (MARGIN_EDGES, [f.margin for f in features]),
            (GAP_EDGES, [f.gap for f in features]),
            (CONFIDENCE_EDGES, [f.confidence for f in features]),
        ],
        hits,
    )
    return HitModel(bias, *steps)


def fit_steps(
    columns: Sequence[tuple[tuple[float, ...], Sequence[float]]],
    hits: Sequence[bool],
    l2: float = 1.0,
) -> tuple[int, list[Steps]]:
    """Logistic regression of `hits` on one indicator per interval of each column's edges.

    Maximum likelihood by Newton's method, with an L2 penalty that keeps sparse intervals
    near zero and every weight finite (so no outcome is ever certain); the result is rounded
    to the integer units the coder adds up: the bias and one step function per column.
    """
    blocks = [np.ones((len(hits), 1))]
    for edges, values in columns:
        bins = np.searchsorted(np.asarray(edges), np.asarray(values, np.float64), "right")
        blocks.append(np.eye(len(edges) + 1)[bins])
    x = np.hstack(blocks)
    y = np.asarray(hits, dtype=np.float64)
    w = np.zeros(x.shape[1])
    penalty = np.full(x.shape[1], l2)
    penalty[0] = 1e-3 * l2  # the bias barely: it carries the overall hit rate
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        gradient = x.T @ (p - y) + penalty * w
        hessian = (x * (p * (1.0 - p))[:, None]).T @ x + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    units = np.clip(np.rint(w / math.log(2) * LOG_ODDS_UNIT), -_MAX_LOG_ODDS, _MAX_LOG_ODDS)
    values = [int(v) for v in units]
    steps, at = [], 1
    for edges, _ in columns:
        steps.append(Steps(edges, tuple(values[at : at + len(edges) + 1])))
        at += len(edges) + 1
    return values[0], steps


def configured(models: ModelsConfig, weak_sha256: str) -> Calibration:
    """The configured calibration, else the one shipped for the pair (both sides must agree:
    the fingerprint compares its digest). The outer has no strong model file, so for a pair
    other than the pinned one it needs `models.calibration`."""
    if models.calibration:
        return Calibration.load(Path(models.calibration).expanduser())
    if models.strong == "strong":
        return for_pair(STRONG.sha256, weak_sha256)
    return Calibration()
