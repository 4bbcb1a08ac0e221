"""`uplimit plan --plot OUT.png`: the seed post's arithmetic (`uplimit.plan`) as a picture.

Time to exfiltrate the weights against bits/token, for per-day budgets sized at 1x, 2x and 10x
the honest traffic at that bits/token (the attacker sends as much as the budget allows), plus a
configured per-day budget as a flat line, with today's measured bits/token marked. Every curve
point is `plan.plan()` itself, so the picture cannot drift from the table `uplimit plan` prints.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uplimit.plan import Plan, plan

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["HEADROOMS", "MEASURED", "MEASURED_DEMO", "days_to_exfiltrate", "plot_plan"]

HEADROOMS = (1.0, 2.0, 10.0)  # per-day budget / honest traffic
# All-in bits/token from the README's "Measured" table (`uplimit bench`, real pair,
# shared/prompts/dev.jsonl, 16 tokens per stream per frame), and the service demo's figure
# (its six answers, few tokens a frame); tests/unit/test_plan_plot.py holds them to the README.
MEASURED = {"T=0": 0.525, "T=0.7": 0.674, "T=1.0": 0.725}
MEASURED_DEMO = 2.9
SOURCE = (
    "measured bits/token: README 'Measured' (uplimit bench, real pair, shared/prompts/dev.jsonl,"
    " 16 tokens/stream/frame); demo: README, its six answers"
)
_YEAR = 365.25


def days_to_exfiltrate(p: Plan, bits_per_token: float, headroom: float | None) -> float:
    """Days to move the weights at `bits_per_token`: per-day budget = headroom x honest traffic,
    or `p`'s own per-day budget when `headroom` is None."""
    per_day = p.per_day_budget_bytes
    if headroom is not None:
        per_day = headroom * p.tokens_per_day * bits_per_token / 8
    q = dataclasses.replace(p, bits_per_token=bits_per_token, per_day_budget_bytes=per_day)
    return plan(q).days_to_exfiltrate


def plot_plan(p: Plan, out: str | Path) -> Figure:
    """Draw the picture for `p` into `out` (PNG) and return the figure."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    bits = np.geomspace(0.01, 40, 200)
    fig, ax = plt.subplots(figsize=(9, 5.6), dpi=110)
    for headroom in HEADROOMS:
        days = [days_to_exfiltrate(p, b, headroom) for b in bits]
        ax.plot(bits, days, label=f"per-day budget = {headroom:g} x honest traffic")
    if p.per_day_budget_bytes is not None:
        days = [days_to_exfiltrate(p, b, None) for b in bits]
        ax.plot(bits, days, "k--", label=f"per-day budget {p.per_day_budget_bytes:.3g} bytes")
    measured = ", ".join(f"{name} {b:g}" for name, b in MEASURED.items())
    ax.axvspan(min(MEASURED.values()), max(MEASURED.values()), color="tab:red", alpha=0.25,
               label=f"measured today: {measured}")  # fmt: skip
    ax.axvline(MEASURED_DEMO, color="tab:red", ls="--", lw=1,
               label=f"measured in the service demo: {MEASURED_DEMO:g}")  # fmt: skip
    own = plan(p).days_to_exfiltrate
    ax.plot([p.bits_per_token], [own], "ko",
            label=f"this plan: {p.bits_per_token:g} bits/token, {own:.3g} days")  # fmt: skip
    for days, label in ((30, "30 days"), (_YEAR, "1 year"), (10 * _YEAR, "10 years")):
        ax.axhline(days, color="grey", lw=0.6, ls=":")
        ax.annotate(label, (0.011, days), va="bottom", fontsize=7, color="grey")
    ax.set(xscale="log", yscale="log", xlabel="uplink bits per token",
           ylabel="days to exfiltrate the weights")  # fmt: skip
    title = (
        f"weights {p.weights_bytes:.3g} bytes, {p.tokens_per_day:.3g} tokens/day,"
        f" attacker share {p.attacker_share:g}"
    )
    if p.lifetime_budget_bytes is not None:
        r = plan(p)
        verdict = "never: lifetime budget stops it" if r.lifetime_stops_attacker else "reachable"
        title += f"\nlifetime budget {p.lifetime_budget_bytes:.3g} bytes: {verdict}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, which="major", alpha=0.3)
    fig.text(0.01, 0.01, SOURCE, fontsize=7, color="tab:red")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return fig
