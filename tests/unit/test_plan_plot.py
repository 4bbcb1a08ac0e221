"""`uplimit plan --plot`: the picture's numbers are `uplimit.plan`'s, and its measured marks
are the README's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from uplimit.cli import app
from uplimit.plan import Plan, plan
from uplimit.plan_plot import HEADROOMS, MEASURED, MEASURED_DEMO, plot_plan

README = Path(__file__).parents[2] / "README.md"


def test_measured_marks_are_the_readme_figures():
    text = README.read_text()
    row = re.search(r"^\| all-in bits/token \(frames, counts, checks\) \|(.*)\|$", text, re.M)
    assert row is not None
    assert [float(c) for c in row.group(1).split("|")] == list(MEASURED.values())
    assert re.search(rf"dominates: {MEASURED_DEMO} bits/token all-in there", text)


def test_plan_plot_draws_plan_arithmetic(tmp_path):
    p = Plan(9e8, 1e8, 0.527, lifetime_budget_bytes=1e7, per_day_budget_bytes=2e6)
    fig = plot_plan(p, tmp_path / "plan.png")
    lines = fig.axes[0].get_lines()
    curves = {line.get_label(): line for line in lines}
    one_x = curves[f"per-day budget = {HEADROOMS[0]:g} x honest traffic"]
    for x, days in zip(one_x.get_xdata()[::50], one_x.get_ydata()[::50], strict=True):
        honest = Plan(9e8, 1e8, x, per_day_budget_bytes=1e8 * x / 8)
        assert days == pytest.approx(plan(honest).days_to_exfiltrate)
    ten_x = curves[f"per-day budget = {HEADROOMS[2]:g} x honest traffic"]
    assert ten_x.get_ydata() == pytest.approx(one_x.get_ydata() / 10)
    flat = curves["per-day budget 2e+06 bytes"].get_ydata()
    assert flat == pytest.approx([9e8 / 2e6] * len(flat))  # the budget, not the traffic
    point = next(line for label, line in curves.items() if label.startswith("this plan"))
    assert point.get_ydata()[0] == pytest.approx(plan(p).days_to_exfiltrate)


def test_plan_cli_writes_the_png(tmp_path):
    out = tmp_path / "plan.png"
    r = CliRunner().invoke(app, [
        "plan", "--weights-bytes", "1e14", "--tokens-per-day", "8e14", "--bits-per-token", "0.1",
        "--plot", str(out),
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as image:
        assert image.size[0] >= 800 and image.size[1] >= 500
