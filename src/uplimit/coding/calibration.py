"""How the coder turns the weak model's view into probabilities: fitted, fixed per model pair.

Each token is coded as "was the decoder's guess right?" and, on a miss, which token it was.
- The hit probability is a step function of one feature the decoder can compute: the margin
  between the guess's score and the runner-up's (weak logits at T = 0; weak logits / T plus
  the shared Gumbel noise at T > 0). A wide margin means a robust guess.
- On a miss the token is coded under softmax(miss_scale * scores) without the guess.

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

from uplimit.config import ModelsConfig
from uplimit.errors import ConfigError
from uplimit.models.pins import STRONG

FLAG_BITS = 16  # hit probabilities are multiples of 2**-16
FLAG_TOTAL = 1 << FLAG_BITS
# A hit probability never reaches 0 or 1: both outcomes must stay codable. 2**-16 caps the
# cost of a surprise at 16 bits and the cost of a certain hit at 2e-5 bits.
_MIN_COUNT, _MAX_COUNT = 1, FLAG_TOTAL - 1


@dataclass(frozen=True)
class FlagModel:
    """P(hit) in units of 2**-16, constant on each interval between consecutive `edges`."""

    edges: tuple[float, ...]
    hit_counts: tuple[int, ...]  # len(edges) + 1 entries in [1, 2**16 - 1]

    def __post_init__(self) -> None:
        if len(self.hit_counts) != len(self.edges) + 1:
            raise ConfigError("a flag model needs one more count than edges")
        if list(self.edges) != sorted(self.edges) or not all(map(math.isfinite, self.edges)):
            raise ConfigError("flag model edges must be finite and increasing")
        if not all(_MIN_COUNT <= c <= _MAX_COUNT for c in self.hit_counts):
            raise ConfigError(f"flag counts must be in [{_MIN_COUNT}, {_MAX_COUNT}]")

    def hit_count(self, feature: float) -> int:
        return self.hit_counts[bisect.bisect_right(self.edges, feature)]


# Margins (in natural-log units) at which the hit probability may change.
DEFAULT_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 13.0)


def _uninformed() -> FlagModel:
    """Before fitting: hit probability rising with the margin like a logistic curve."""
    counts = [
        min(_MAX_COUNT, max(_MIN_COUNT, round(FLAG_TOTAL / (1 + math.exp(-m)))))
        for m in (-0.5, *DEFAULT_EDGES)
    ]
    return FlagModel(DEFAULT_EDGES, tuple(counts))


@dataclass(frozen=True)
class Calibration:
    greedy_flag: FlagModel = field(default_factory=_uninformed)
    greedy_miss_scale: float = 1.0
    sampled_flag: FlagModel = field(default_factory=_uninformed)
    sampled_miss_scale: float = 1.0
    note: str = "uninformed defaults"

    def __post_init__(self) -> None:
        for scale in (self.greedy_miss_scale, self.sampled_miss_scale):
            if not (math.isfinite(scale) and 0.05 <= scale <= 20.0):
                raise ConfigError(f"miss scale must be in [0.05, 20], got {scale}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        try:
            raw = json.loads(text)
            return cls(
                greedy_flag=_flag(raw["greedy_flag"]),
                greedy_miss_scale=float(raw["greedy_miss_scale"]),
                sampled_flag=_flag(raw["sampled_flag"]),
                sampled_miss_scale=float(raw["sampled_miss_scale"]),
                note=str(raw.get("note", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"invalid calibration: {e}") from e

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        return cls.from_json(Path(path).read_text())

    def digest(self) -> str:
        """sha256 of what changes coding (not the note)."""
        data = asdict(self)
        data.pop("note")
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


def _flag(raw: dict) -> FlagModel:
    return FlagModel(
        tuple(float(e) for e in raw["edges"]), tuple(int(c) for c in raw["hit_counts"])
    )


def fit_flag(
    features: Sequence[float], hits: Sequence[bool], edges: tuple[float, ...] = DEFAULT_EDGES
) -> FlagModel:
    """Maximum-likelihood step function, with add-one smoothing so no bin is certain.

    Bins are forced to be non-decreasing in the margin (pool-adjacent-violators), which a wider
    margin should give and which keeps sparse bins from overfitting.
    """
    bins = np.searchsorted(np.asarray(edges), np.asarray(features, dtype=np.float64), "right")
    n_hit = np.bincount(bins, weights=np.asarray(hits, dtype=np.float64), minlength=len(edges) + 1)
    n_all = np.bincount(bins, minlength=len(edges) + 1).astype(np.float64)
    blocks = [[h + 1.0, n + 2.0, 1] for h, n in zip(n_hit, n_all, strict=True)]
    merged: list[list[float]] = []
    for block in blocks:  # pool adjacent violators on the smoothed rates
        merged.append(block)
        while len(merged) > 1 and merged[-2][0] / merged[-2][1] > merged[-1][0] / merged[-1][1]:
            h, n, k = merged.pop()
            merged[-1] = [merged[-1][0] + h, merged[-1][1] + n, merged[-1][2] + k]
    counts: list[int] = []
    for h, n, k in merged:
        c = min(_MAX_COUNT, max(_MIN_COUNT, round(FLAG_TOTAL * h / n)))
        counts += [c] * int(k)
    return FlagModel(tuple(edges), tuple(counts))


def configured(models: ModelsConfig, weak_sha256: str) -> Calibration:
    """The configured calibration, else the one shipped for the pair (both sides must agree:
    the fingerprint compares its digest). The outer has no strong model file, so for a pair
    other than the pinned one it needs `models.calibration`."""
    if models.calibration:
        return Calibration.load(Path(models.calibration).expanduser())
    if models.strong == "strong":
        return for_pair(STRONG.sha256, weak_sha256)
    return Calibration()
