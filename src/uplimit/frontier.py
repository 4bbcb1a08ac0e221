"""`uplimit frontier`: bits/token against pass@1 over settings of a compression knob.

Each setting is one `uplimit quality` run (`quality.run_quality`: HumanEval problems through
the strong model with that decoding, coded and decoded exactly, each answer's program tested in
the sandbox). The knob is the one the temperature allows (`coding.sampling`): `tie_nats` at
T = 0, `tilt` at T > 0; its 0 is the exact mode, the frontier's reference point. The picture
plots each run's all-in bits/token against its pass@1 with the 95 % Wilson interval, so the
trade is read off one figure; the JSON keeps every run whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from uplimit.bench import BenchSettings
from uplimit.coding.calibration import Calibration
from uplimit.models.base import LanguageModel
from uplimit.progress import Progress
from uplimit.prompts import Problem
from uplimit.quality import Sandbox, run_quality

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["knob_for", "plot_frontier", "run_frontier"]


def knob_for(temperature: float) -> str:
    """The knob a temperature allows: tie_nats at T = 0, tilt at T > 0."""
    return "tie_nats" if temperature == 0.0 else "tilt"


def run_frontier(
    problems: Sequence[Problem],
    settings: BenchSettings,
    values: Sequence[float],
    models: tuple[LanguageModel, LanguageModel, LanguageModel, Calibration],
    sandbox: Sandbox,
    progress: Progress | None = None,
) -> dict:
    """One quality run per knob value (`settings.params` gives everything else); JSON-ready."""
    knob = knob_for(settings.params.temperature)
    # Every setting is checked like a request's before the first (long) run starts.
    sweep = [replace(settings.params, **{knob: value}) for value in values]
    runs = [
        run_quality(problems, replace(settings, params=params), *models, sandbox, progress)
        for params in sweep
    ]
    return {
        "knob": knob,
        "temperature": settings.params.temperature,
        "problems": len(problems),
        "points": [
            {
                knob: value,
                "bits_per_token": r["bits_per_token"],
                "payload_bits_per_token": r["payload_bits_per_token"],
                "pass_at_1": r["pass_at_1"],
                "pass_at_1_interval_95": r["pass_at_1_interval_95"],
                "steered_share": r["steered_share"],
            }
            for value, r in zip(values, runs, strict=True)
        ],
        "runs": runs,
    }


def plot_frontier(result: dict, out: str | Path) -> Figure:
    """Draw `run_frontier`'s points into `out` (PNG or SVG, by its suffix); returns the figure."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    knob, points = result["knob"], result["points"]
    x = [p["bits_per_token"] for p in points]
    y = [p["pass_at_1"] for p in points]
    low = [p["pass_at_1"] - p["pass_at_1_interval_95"][0] for p in points]
    high = [p["pass_at_1_interval_95"][1] - p["pass_at_1"] for p in points]
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=4,
                label=f"{knob} (T = {result['temperature']:g}); bars: 95 % interval")  # fmt: skip
    for p, xi, yi in zip(points, x, y, strict=True):
        ax.annotate(f"{knob} {p[knob]:g}", (xi, yi), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel("all-in bits/token (uplink frames)")
    ax.set_ylabel(f"HumanEval pass@1 ({result['problems']} problems)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ax.set_title("Compression-aware decoding: bits against quality")
    fig.tight_layout()
    fig.savefig(out)
    return fig
