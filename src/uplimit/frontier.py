"""`uplimit frontier`: bits/token against pass@1 over settings of a compression knob.

Each setting is one `uplimit quality` run (`quality.run_quality`: HumanEval problems through
the strong model with that decoding, coded and decoded exactly, each answer's program tested in
the sandbox). The knob is the one the temperature allows (`coding.sampling`): `tie_nats` at
T = 0, `tilt` at T > 0; its 0 is the exact mode, the frontier's reference point. The picture
plots each run's all-in bits/token against its pass@1 with the 95 % Wilson interval, so the
trade is read off one figure; the JSON keeps every run whole, and with the exact mode in the
sweep each point counts the problems it lost and gained against it.

A sweep over all 164 problems takes about an hour per setting on a small CPU machine, so each
run can be kept as it finishes (`store`): a rerun reuses the stored runs measured exactly as it
would measure them, measures the rest, and refuses a stored run measured otherwise rather than
mixing two measurements in one picture.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from uplimit.bench import BenchSettings
from uplimit.coding.calibration import Calibration
from uplimit.coding.sampling import knob_name
from uplimit.errors import ConfigError
from uplimit.models.base import LanguageModel
from uplimit.progress import Progress
from uplimit.prompts import Problem
from uplimit.quality import Sandbox, paired_loss_interval, run_quality

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_frontier", "run_frontier"]

Models = tuple[LanguageModel, LanguageModel, LanguageModel, Calibration]


def run_frontier(
    problems: Sequence[Problem],
    settings: BenchSettings,
    values: Sequence[float],
    models: Models,
    sandbox: Sandbox,
    progress: Progress | None = None,
    store: Path | None = None,
) -> dict:
    """One quality run per knob value (`settings.params` gives everything else); JSON-ready.

    With `store` (a directory), each run is written there as `<knob>-<value>.json` when it
    finishes, and one already there is reused if it was measured with the same settings,
    models, calibration, sandbox and problems (`ConfigError` if it was not)."""
    knob = knob_name(settings.params.greedy)
    # Every setting is checked like a request's before the first (long) run starts.
    sweep = [replace(settings, params=replace(settings.params, **{knob: v})) for v in values]
    paths: list[Path | None] = [None] * len(values)
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
        paths = [store / f"{knob}-{value:g}.json" for value in values]
    runs = [
        _run_or_reuse(problems, one, models, sandbox, progress, path)
        for one, path in zip(sweep, paths, strict=True)
    ]
    exact = next((r for value, r in zip(values, runs, strict=True) if value == 0), None)
    return {
        "knob": knob,
        "temperature": settings.params.temperature,
        "problems": len(problems),
        "points": [
            {
                knob: value,
                "bits_per_token": r["bits_per_token"],
                "payload_bits_per_token": r["payload_bits_per_token"],
                # What the link pays per answer: a knob that lengthens answers pays it back.
                "bits_per_answer": r["bits_per_token"] * r["tokens"] / r["problems"],
                "pass_at_1": r["pass_at_1"],
                "pass_at_1_interval_95": r["pass_at_1_interval_95"],
                "steered_share": r["steered_share"],
                "versus_exact": _paired(exact, r) if exact else None,
            }
            for value, r in zip(values, runs, strict=True)
        ],
        "runs": runs,
    }


def _paired(exact: dict, run: dict) -> dict:
    """Problem by problem against the exact mode's run: the problems this setting fails that
    the exact mode passed (`lost`) and the reverse (`gained`), and the pass@1 lost,
    (lost - gained) / problems, with its 95 % interval for paired runs. The pairing sees a
    difference that two overlapping intervals hide, and says how large a loss the problems
    cannot rule out."""
    pairs = [
        (e["passed"], r["passed"])
        for e, r in zip(exact["per_problem"], run["per_problem"], strict=True)
    ]
    table = [
        sum(pair == cell for pair in pairs)
        for cell in ((True, True), (True, False), (False, True), (False, False))
    ]
    loss, low, high = paired_loss_interval(*table)
    return {
        "lost": table[1],
        "gained": table[2],
        "pass_at_1_lost": loss,
        "pass_at_1_lost_interval_95": [low, high],
    }


def _run_or_reuse(
    problems: Sequence[Problem],
    settings: BenchSettings,
    models: Models,
    sandbox: Sandbox,
    progress: Progress | None,
    path: Path | None,
) -> dict:
    """The quality run stored at `path` if it matches these inputs, else a new one (stored)."""
    if path is not None and path.exists():
        wanted = _identity_wanted(problems, settings, models, sandbox)
        try:
            stored = json.loads(path.read_text())
            found = _identity_of(stored)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path} is not a stored quality run ({e}); move it away") from e
        if found != wanted:
            differ = ", ".join(k for k in wanted if found[k] != wanted[k])
            raise ConfigError(
                f"{path} was measured with other {differ}; move it away or store this sweep "
                "in another directory"
            )
        return stored
    run = run_quality(problems, settings, *models, sandbox, progress)
    if path is not None:
        staging = path.with_name(f".{path.name}.partial")
        staging.write_text(json.dumps(run, indent=2))
        os.replace(staging, path)  # a crash leaves the whole run or none
    return run


def _identity_of(run: dict) -> dict:
    """What decides a quality run's numbers, as its JSON records it."""
    return {
        "settings": run["settings"],
        "models": [run["models"]["strong"]["sha256"], run["models"]["weak"]["sha256"]],
        "calibration": run["calibration"]["digest"],
        "sandbox": run["sandbox"],
        "problems": [p["task_id"] for p in run["per_problem"]],
    }


def _identity_wanted(
    problems: Sequence[Problem], settings: BenchSettings, models: Models, sandbox: Sandbox
) -> dict:
    """`_identity_of` the run these inputs would make (through JSON, as a stored one went)."""
    strong, weak, _, calibration = models
    identity = {
        "settings": settings.record(),
        "models": [strong.info.file_sha256, weak.info.file_sha256],
        "calibration": calibration.digest(),
        "sandbox": sandbox.record(),
        "problems": [p.task_id for p in problems],
    }
    return json.loads(json.dumps(identity))


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
