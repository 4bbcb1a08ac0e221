"""Which features the hit model should use, and what a copy model could save (docs/codec.md).

    nice -n 10 .venv/bin/python scripts/measure_hit_features.py --count 160 --seed 11 \
        --temperature 0 [--tie-nats D | --tilt L] [--max-tokens 128] [--json OUT]

The strong model answers `count` training prompts (`prompts.training_set`: HumanEval and
standard-library questions, never dev.jsonl); the weak model runs along every answer as the
codec runs it (`calibrate.walk`). Then:

1. The hit flag's cost, in bits per token, under hit models fitted on one half of the answers
   (by index parity) and scored on the other, and back: margin only (the model before issue
   17), the shipped three features (margin, gap, confidence), and the shipped three plus each
   feature that needs the stream's history: position, hits among the last 8 guesses, and
   whether a copy model's candidate (the token after the latest earlier occurrence of the
   context's longest matching suffix, prompt included) agrees with the guess. Beside them, the
   shipped calibration as it is, not refitted: with `--tie-nats` or `--tilt` the answers are
   steered (compression-aware decoding), and the difference is what a calibration fitted
   with the knob on would save.
2. The miss distribution's scale: one scale for every miss (as shipped) against one per
   margin interval, each chosen on one half and scored on the other.
3. An upper bound on what mixing a copy model into the miss distribution could save: the miss
   cost (under the shipped miss scale) of every miss whose copy candidate is the token, as if
   those tokens became free and no other token paid for it.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uplimit.calibrate import Position, flag_bits, miss_costs, walk
from uplimit.coding.calibration import (
    CONFIDENCE_EDGES,
    FLAG_TOTAL,
    GAP_EDGES,
    MARGIN_EDGES,
    Features,
    fit_steps,
    for_pair,
    hit_count_of,
)
from uplimit.coding.codec import Prediction
from uplimit.coding.sampling import SamplingParams
from uplimit.models.loading import load_model
from uplimit.prompts import training_set

RECENT = 8  # guesses the recent hit count looks back on
MAX_MATCH = 16  # the copy model's longest suffix
MISS_MARGINS = (0.25, 0.5, 1.0, 2.0, 4.0)  # intervals that may each get their own miss scale


def copy_candidate(context: Sequence[int]) -> tuple[int, int]:
    """(token, match length) after the latest earlier occurrence of the context's longest
    matching suffix (up to MAX_MATCH tokens); (-1, 0) when the last token never occurred."""
    best_token, best_length = -1, 0
    end = len(context)
    for j in range(end - 1, 0, -1):
        n = 0
        while n < MAX_MATCH and j - 1 - n >= 0 and context[j - 1 - n] == context[end - 1 - n]:
            n += 1
        if n > best_length:
            best_token, best_length = context[j], n
            if n == MAX_MATCH:
                break
    return best_token, best_length


@dataclass(frozen=True)
class Seen:
    """What the measurement keeps of one position (a prediction holds the whole vocabulary)."""

    answer: int
    features: Features
    hit: bool
    guess: int
    copy_token: int
    copy_length: int
    miss_bits: float  # the token's cost after the miss flag; 0 on a hit
    copy_is_token: bool
    miss_bits_by_scale: np.ndarray | None  # the same at each of calibrate.MISS_SCALES


def seen(at: Position, miss_scale: float) -> Seen:
    pred = at.prediction
    copy_token, copy_length = copy_candidate(at.context)
    miss_bits, by_scale = 0.0, None
    if not at.hit:
        scaled = Prediction(pred.guess, pred.features, pred.hit_count, pred.scores, miss_scale)
        miss_bits = scaled.miss_table().cost_bits(at.token)
        by_scale = miss_costs(pred.scores, pred.guess, at.token)
    return Seen(at.answer, pred.features, at.hit, pred.guess, copy_token, copy_length,
                miss_bits, copy_token == at.token, by_scale)  # fmt: skip


def history_columns(positions: Sequence[Seen]) -> dict[str, tuple[tuple[float, ...], list]]:
    """Each history feature as (edges, value per position)."""
    position, recent, copy_agrees = [], [], []
    hits: dict[int, list[bool]] = {}
    for at in positions:
        past = hits.setdefault(at.answer, [])
        position.append(len(past))
        recent.append(sum(past[-RECENT:]) if len(past) >= RECENT else -1)
        agrees = 0 if at.copy_token < 0 else (1 if at.copy_token == at.guess else 2)
        copy_agrees.append(agrees * 4 + int(np.searchsorted((2, 4, 8), at.copy_length, "right")))
        past.append(at.hit)
    return {
        "position": ((1, 2, 4, 8, 16, 32, 64), position),
        "recent hits": (tuple(range(RECENT + 1)), recent),
        "copy agrees": (tuple(k + 0.5 for k in range(11)), copy_agrees),
    }


def cross_validated_bits(columns: list, hits: np.ndarray, fold: np.ndarray) -> float:
    """Flag bits per token: fitted on each half, scored on the other."""
    total = 0.0
    for held in (0, 1):
        train, test = fold != held, fold == held
        bias, steps = fit_steps([(e, np.asarray(v)[train]) for e, v in columns], hits[train])
        for i in np.flatnonzero(test):
            z = bias + sum(s(float(v[i])) for s, (_, v) in zip(steps, columns, strict=True))
            p = hit_count_of(z) / FLAG_TOTAL
            total -= math.log2(p if hits[i] else 1.0 - p)
    return total / len(hits)


def cross_validated_miss_bits(misses: Sequence[Seen], edges: tuple[float, ...]) -> float:
    """Miss-token bits (summed) with the best scale per margin interval, chosen on one half
    (by answer parity) and scored on the other; no edges: one scale for all."""
    costs = np.array([at.miss_bits_by_scale for at in misses])
    bins = np.searchsorted(edges, [at.features.margin for at in misses], "right")
    fold = np.array([at.answer % 2 for at in misses])
    total = 0.0
    for held in (0, 1):
        for b in range(len(edges) + 1):
            train = (fold != held) & (bins == b)
            test = (fold == held) & (bins == b)
            if test.any():
                pool = train if train.any() else fold != held
                total += costs[test, int(np.argmin(costs[pool].sum(axis=0)))].sum()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=160)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--tie-nats", type=float, default=0.0)
    parser.add_argument("--tilt", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    strong, weak = load_model("strong"), load_model("weak")
    calibration = for_pair(strong.info.file_sha256, weak.info.file_sha256)
    params = SamplingParams(args.temperature, tie_nats=args.tie_nats, tilt=args.tilt)
    model, scale = calibration.regime(params.greedy, params.knob)

    def progress(label: str, done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total}", end="", flush=True)

    walked = walk(strong, weak, training_set(args.count, args.seed), params, args.max_tokens,
                  args.seed, progress)  # fmt: skip
    positions = [seen(at, scale) for at in walked]
    print()
    hits = np.array([at.hit for at in positions])
    fold = np.array([at.answer % 2 for at in positions])
    shipped = [
        (MARGIN_EDGES, [at.features.margin for at in positions]),
        (GAP_EDGES, [at.features.gap for at in positions]),
        (CONFIDENCE_EDGES, [at.features.confidence for at in positions]),
    ]
    history = history_columns(positions)
    as_shipped = flag_bits(model, [at.features for at in positions], hits)
    flag_bits_per_token = {
        "shipped calibration, not refitted": as_shipped / len(positions),
        "margin": cross_validated_bits(shipped[:1], hits, fold),
        "margin, gap, confidence (shipped)": cross_validated_bits(shipped, hits, fold),
    }
    for name, column in history.items():
        flag_bits_per_token[f"shipped + {name}"] = cross_validated_bits(
            [*shipped, column], hits, fold
        )
    flag_bits_per_token["shipped + all three"] = cross_validated_bits(
        [*shipped, *history.values()], hits, fold
    )
    n = len(positions)
    misses = [at for at in positions if not at.hit]
    copyable = [at for at in misses if at.copy_is_token]
    result = {
        "temperature": args.temperature,
        "tie_nats": args.tie_nats,
        "tilt": args.tilt,
        "answers": args.count,
        "tokens": n,
        "hit_rate": float(hits.mean()),
        "flag_bits_per_token_cross_validated": flag_bits_per_token,
        "miss_scale": scale,
        "miss_token_bits_per_token": sum(at.miss_bits for at in misses) / n,
        "miss_token_bits_per_token_cross_validated": {
            "one scale": cross_validated_miss_bits(misses, ()) / n,
            "a scale per margin interval": cross_validated_miss_bits(misses, MISS_MARGINS) / n,
        },
        "misses": len(misses),
        "misses_the_copy_candidate_names": len(copyable),
        "copy_model_saving_bound_bits_per_token": sum(at.miss_bits for at in copyable) / n,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
