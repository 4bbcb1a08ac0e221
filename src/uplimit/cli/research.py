"""`uplimit bench|quality|frontier|speed|calibrate|plan|load`: measurements, the coder's fit,
the seed post's sums, and a running deployment under load."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from uplimit.cli.common import app, console, counter_bar, progress_bar

# Options several measurements share.
_TIE_NATS = typer.Option(
    0.0,
    help="T=0: emit the weak model's guess when the strong logit for it is within this"
    " many nats of the top (compression-aware; 0: exact output).",
)
_TILT = typer.Option(
    0.0, help="T>0: sample from p^(1-L) q^L, L in [0, 1] (compression-aware; 0: exact)."
)
_CALIBRATION = typer.Option(
    None, help="Calibration JSON (default: the one shipped for this model pair)."
)
_STRONG = typer.Option("strong", help="Strong model: 'strong', a GGUF file or HF dir.")
_WEAK = typer.Option("weak", help="Weak model: 'weak', a GGUF file or HF dir.")
_FRAME_TOKENS = typer.Option(16, help="Tokens per stream per frame.")
_PROBLEMS = typer.Option(None, min=1, help="Only the first K of HumanEval's 164 problems.")
_ANSWER_TOKENS = typer.Option(512, help="Tokens per answer at most.")
_PROBLEM_SEED = typer.Option(0, help="Base of the per-problem sampling seeds.")
_TEST_TIMEOUT = typer.Option(10.0, help="Each problem's tests get this long.")
_ALLOW_NETWORK = typer.Option(
    False, help="Run the tests even where no network namespace can be made (unsafe)."
)


@app.command(rich_help_panel="Measure")
def bench(
    prompts: Path = typer.Option(..., help="JSONL file: one {id, messages} per line."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    top_k: int = typer.Option(0, help="Keep only the k most probable tokens (0: off)."),
    tie_nats: float = _TIE_NATS,
    tilt: float = _TILT,
    max_tokens: int = typer.Option(128, help="Tokens generated per prompt at most."),
    limit: int | None = typer.Option(None, help="Use only the first K prompts."),
    streams: int | None = typer.Option(
        None, help="Run this many concurrent streams, cycling through the prompts (new seeds)."
    ),
    frame_tokens: int = _FRAME_TOKENS,
    seed: int = typer.Option(0, help="Base of the per-prompt sampling seeds."),
    calibration: Path | None = _CALIBRATION,
    strong: str = _STRONG,
    weak: str = _WEAK,
    json_out: Path | None = typer.Option(None, "--json", help="Write the full result here."),
) -> None:
    """Generate with the strong model, code the responses in frames, decode, compare.

    Prints bits per token (all-in, payload, plain weak-model coding, general-purpose
    compressors), the decoder's guess rate, exactness and coding speed.
    """
    import itertools
    import json

    from uplimit.bench import BenchSettings, run_bench, summary_rows
    from uplimit.coding.sampling import SamplingParams
    from uplimit.prompts import Prompt, load_jsonl

    records = load_jsonl(prompts)[:limit]
    if streams:
        records = [
            Prompt(f"{p.id}#{i // len(records)}", p.messages)
            for i, p in zip(range(streams), itertools.cycle(records), strict=False)
        ]
    settings = BenchSettings(
        SamplingParams(temperature, top_p, top_k, tie_nats, tilt), max_tokens, frame_tokens, seed
    )
    models = _coding_models(strong, weak, calibration)
    with progress_bar() as update:
        result = run_bench(records, settings, *models, update)
    table = Table("measure", "value", title=f"uplimit bench: {prompts.name}, T={temperature}")
    for label, value in summary_rows(result):
        table.add_row(label, value)
    Console().print(table)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {json_out}")
    if not result["exact_roundtrip"]:
        raise typer.Exit(1)


def _numbers(text: str, option: str) -> list[float]:
    """A comma-separated list of numbers given to `option` ("" is none)."""
    try:
        return [float(v) for v in text.split(",")] if text.strip() else []
    except ValueError as e:
        raise typer.BadParameter(f"{option} must be numbers separated by commas: {e}") from e


def _coding_models(strong: str, weak: str, calibration: Path | None) -> tuple:
    """(strong, weak encoder, weak decoder, calibration) for a codec measurement: the decoder
    is a separately loaded instance, as the outer side has."""
    from uplimit.coding.calibration import Calibration, for_pair
    from uplimit.models.loading import ModelPair, load_model

    with console.status("loading models"):
        pair = ModelPair(load_model(strong), load_model(weak))
        decoder_weak = load_model(weak)
    calib = (
        Calibration.load(calibration)
        if calibration
        else for_pair(pair.strong.info.file_sha256, pair.weak.info.file_sha256)
    )
    return pair.strong, pair.weak, decoder_weak, calib


@app.command(rich_help_panel="Measure")
def quality(
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    tie_nats: float = _TIE_NATS,
    tilt: float = _TILT,
    max_tokens: int = _ANSWER_TOKENS,
    limit: int | None = _PROBLEMS,
    seed: int = _PROBLEM_SEED,
    frame_tokens: int = _FRAME_TOKENS,
    timeout_s: float = _TEST_TIMEOUT,
    allow_network: bool = _ALLOW_NETWORK,
    calibration: Path | None = _CALIBRATION,
    strong: str = _STRONG,
    weak: str = _WEAK,
    json_out: Path | None = typer.Option(None, "--json", help="Write the full result here."),
) -> None:
    """HumanEval through the strong model as served: pass@1 and the answers' bits/token.

    Each answer is generated with the given decoding, coded against the weak model and
    decoded back, and its program runs against the problem's tests without network
    (uplimit.quality).
    """
    import json

    from uplimit.bench import BenchSettings
    from uplimit.coding.sampling import SamplingParams
    from uplimit.prompts import humaneval_problems
    from uplimit.quality import Sandbox, run_quality

    sandbox = Sandbox.for_host(allow_network=allow_network, timeout_s=timeout_s)
    problems = humaneval_problems()[:limit]
    params = SamplingParams(temperature, tie_nats=tie_nats, tilt=tilt)
    settings = BenchSettings(params, max_tokens, frame_tokens, seed)
    models = _coding_models(strong, weak, calibration)
    with progress_bar() as update:
        result = run_quality(problems, settings, *models, sandbox, update)
    low, high = result["pass_at_1_interval_95"]
    table = Table("measure", "value", title=f"uplimit quality: HumanEval, T={temperature}")
    table.add_row("problems", str(result["problems"]))
    table.add_row("passed", str(result["passed"]))
    table.add_row("pass@1", f"{result['pass_at_1']:.3f} (95 % interval {low:.3f}-{high:.3f})")
    table.add_row("bits/token, all-in frames", f"{result['bits_per_token']:.3f}")
    table.add_row("bits/token, payload", f"{result['payload_bits_per_token']:.3f}")
    table.add_row("tokens steered by tie_nats / tilt", f"{100 * result['steered_share']:.1f} %")
    table.add_row("tests' network", result["sandbox"]["network"])
    Console().print(table)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {json_out}")
    if not result["exact_roundtrip"]:
        raise typer.Exit(1)


@app.command(rich_help_panel="Measure")
def frontier(
    temperature: float = typer.Option(
        0.0, help="Sampling temperature: 0 sweeps tie_nats, above 0 sweeps tilt."
    ),
    values: str = typer.Option(
        "0,0.5,1,2", help="The knob's settings, comma-separated (0: the exact mode)."
    ),
    limit: int | None = _PROBLEMS,
    max_tokens: int = _ANSWER_TOKENS,
    seed: int = _PROBLEM_SEED,
    frame_tokens: int = _FRAME_TOKENS,
    timeout_s: float = _TEST_TIMEOUT,
    allow_network: bool = _ALLOW_NETWORK,
    calibration: Path | None = _CALIBRATION,
    strong: str = _STRONG,
    weak: str = _WEAK,
    plot: Path = typer.Option(..., help="Write the picture here (.png or .svg)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write every run here."),
    runs: Path | None = typer.Option(
        None,
        help="Keep each setting's run in this directory as it finishes; a rerun reuses the "
        "runs there measured alike and measures the rest.",
    ),
) -> None:
    """Bits/token against pass@1: one `uplimit quality` run per setting of the knob the
    temperature allows (tie_nats at T=0, tilt at T>0), drawn as one picture (uplimit.frontier)."""
    import json

    from uplimit.bench import BenchSettings
    from uplimit.coding.sampling import SamplingParams
    from uplimit.frontier import plot_frontier, run_frontier
    from uplimit.prompts import humaneval_problems
    from uplimit.quality import Sandbox

    sweep = _numbers(values, "--values")
    sandbox = Sandbox.for_host(allow_network=allow_network, timeout_s=timeout_s)
    problems = humaneval_problems()[:limit]
    settings = BenchSettings(SamplingParams(temperature), max_tokens, frame_tokens, seed)
    models = _coding_models(strong, weak, calibration)
    with progress_bar() as update:
        result = run_frontier(problems, settings, sweep, models, sandbox, update, runs)
    if json_out:  # first: the runs are the costly part, the picture can be drawn again
        json_out.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {json_out}")
    plot_frontier(result, plot)
    knob = result["knob"]
    table = Table(
        knob, "bits/token", "bits/answer", "pass@1", "vs exact: lost, gained",
        "points lost (95 %)", "steered",
        title=f"uplimit frontier: T={temperature}",
    )  # fmt: skip
    for p in result["points"]:
        paired = p["versus_exact"] if p[knob] else None  # the exact mode is the reference
        table.add_row(f"{p[knob]:g}", f"{p['bits_per_token']:.3f}", f"{p['bits_per_answer']:.1f}",
                      f"{p['pass_at_1']:.3f}",
                      f"{paired['lost']}, {paired['gained']}" if paired else "-",
                      _points_lost(paired) if paired else "-",
                      f"{100 * p['steered_share']:.1f} %")  # fmt: skip
    Console().print(table)
    console.print(f"wrote {plot}")
    if not all(r["exact_roundtrip"] for r in result["runs"]):
        raise typer.Exit(1)


def _points_lost(paired: dict) -> str:
    """Pass@1 lost against the exact mode in points, with its 95 % interval."""
    low, high = paired["pass_at_1_lost_interval_95"]
    return f"{100 * paired['pass_at_1_lost']:+.1f} ({100 * low:+.1f}, {100 * high:+.1f})"


@app.command(rich_help_panel="Measure")
def speed(
    prompts: Path = typer.Option(..., help="JSONL file: one {id, messages} per line."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    max_tokens: int = typer.Option(64, help="Tokens generated per prompt at most."),
    limit: int | None = typer.Option(None, help="Use only the first K prompts."),
    max_batch: int = typer.Option(4, help="Strong sequences generated at once."),
    draft_tokens: int = typer.Option(4, help="Weak-model drafts per step in the speculative runs."),
    rounds: int = typer.Option(2, help="Each round runs both modes, in alternating order."),
    seed: int = typer.Option(0, help="Base of the per-prompt sampling seeds."),
    strong: str = _STRONG,
    weak: str = _WEAK,
    json_out: Path | None = typer.Option(None, "--json", help="Write the full result here."),
) -> None:
    """Inner generation throughput with and without the weak model as speculative drafter."""
    import json

    from uplimit.coding.sampling import SamplingParams
    from uplimit.models.loading import ModelPair, load_model
    from uplimit.prompts import load_jsonl
    from uplimit.speed import SpeedSettings, run_speed

    records = load_jsonl(prompts)[:limit]
    settings = SpeedSettings(
        SamplingParams(temperature), max_tokens, max_batch, draft_tokens, rounds, seed
    )
    with console.status("loading models"):
        pair = ModelPair(load_model(strong), load_model(weak))
    with console.status("generating, alternating plain and speculative runs"):
        result = run_speed(records, settings, pair.strong, pair.weak)
    table = Table(
        "measure", "plain", f"{draft_tokens} drafts", title=f"uplimit speed, T={temperature}"
    )
    for key in ("tokens", "seconds", "tokens_per_s", "strong_s", "draft_s"):
        plain, spec = result["plain"][key], result["speculative"][key]
        table.add_row(key, f"{plain:,.2f}", f"{spec:,.2f}")
    Console().print(table)
    console.print(
        f"speed-up {result['speedup']:.2f}x, drafts accepted {result['acceptance']:.1%}, "
        f"{result['tokens_per_strong_call']:.2f} tokens per strong call, "
        f"{result['streams_identical_to_plain']}/{result['prompts']} streams identical to plain"
    )
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {json_out}")


@app.command(rich_help_panel="Measure")
def calibrate(
    out: Path = typer.Option(..., help="Where to write the calibration JSON."),
    count: int = typer.Option(
        64, help="Training prompts (HumanEval + standard-library questions)."
    ),
    temperatures: str = typer.Option("0,0.7,1.0", help="Comma-separated; 0 is greedy."),
    tie_nats: str = typer.Option(
        "", help="Also fit a hit model for T=0 answers steered by each tie_nats (comma-separated)."
    ),
    tilt: str = typer.Option(
        "", help="Also fit a hit model for T>0 answers steered by each tilt (comma-separated)."
    ),
    onto: Path | None = typer.Option(
        None,
        help="Keep this calibration's models and add (or replace) only the steered ones fitted "
        "now: the exact-mode answers are not walked.",
    ),
    max_tokens: int = typer.Option(128, help="Tokens per answer."),
    seed: int = typer.Option(1, help="Sampling seed base and prompt-selection seed."),
    strong: str = _STRONG,
    weak: str = _WEAK,
    prompts_file: Path | None = typer.Option(
        None,
        "--prompts",
        help="Fit on the first COUNT prompts of this JSONL file instead (e.g. ones a distilled "
        "weak model was not trained on).",
    ),
) -> None:
    """Fit how the coder predicts the strong model from the weak one (never on eval prompts)."""
    from uplimit.calibrate import Regime, fit, observe_regimes
    from uplimit.coding.calibration import Calibration
    from uplimit.errors import InvalidRequest
    from uplimit.models.loading import ModelPair, load_model
    from uplimit.prompts import load_jsonl, training_set

    temps = _numbers(temperatures, "--temperatures")
    ties, tilts = _numbers(tie_nats, "--tie-nats"), _numbers(tilt, "--tilt")
    if (ties and 0.0 not in temps) or (tilts and not any(t > 0 for t in temps)):
        raise typer.BadParameter("--tie-nats needs 0 among --temperatures, --tilt one above 0")
    if onto and not (ties or tilts):
        raise typer.BadParameter("--onto adds steered models: give --tie-nats or --tilt")
    base = Calibration.load(onto) if onto else None
    try:  # every setting is checked before the first (long) walk
        for t in temps:
            for knob in ties if t == 0 else tilts:
                Regime(t == 0, knob).params(t)
    except InvalidRequest as e:
        raise typer.BadParameter(str(e)) from e
    prompts = load_jsonl(prompts_file)[:count] if prompts_file else training_set(count, seed)
    with console.status("loading models"):
        pair = ModelPair(load_model(strong), load_model(weak))
    with progress_bar() as update:
        observed = observe_regimes(
            pair.strong, pair.weak, prompts, temps, max_tokens, seed, update,
            tie_nats=ties, tilts=tilts, exact=base is None,
        )  # fmt: skip
    knobs = (f", tie_nats in {ties}" if ties else "") + (f", tilt in {tilts}" if tilts else "")
    note = (
        f"{'steered models ' if base else ''}fitted by `uplimit calibrate` on {len(prompts)} "
        f"{prompts_file.name if prompts_file else 'training'} prompts (seed {seed}), "
        f"T in {temps}{knobs}, {max_tokens} tokens; strong {pair.strong.info.file_sha256[:16]}, "
        f"weak {pair.weak.info.file_sha256[:16]}"
    )
    if base:
        note = f"{base.note}; {note}"
    calibration, reports = fit(observed, note, onto=base)
    table = Table("regime", "tokens", "guess hit rate", "miss scale", "bits/token (train)")
    for r in reports:
        table.add_row(
            r.regime, str(r.tokens), f"{100 * r.hit_rate:.1f} %", f"{r.miss_scale}",
            f"{r.bits_per_token:.3f}",
        )  # fmt: skip
    Console().print(table)
    out.write_text(calibration.to_json() + "\n")
    console.print(f"wrote {out} (digest {calibration.digest()[:16]})")


@app.command(rich_help_panel="Measure")
def plan(
    weights_bytes: float | None = typer.Option(None, help="Size of the strong weights, bytes."),
    parameters: float | None = typer.Option(None, help="Or: parameter count ..."),
    bytes_per_parameter: float = typer.Option(2.0, help="... times bytes per parameter."),
    tokens_per_day: float = typer.Option(..., help="Tokens served per day."),
    bits_per_token: float | None = typer.Option(None, help="Uplink bits per token (assumed)."),
    bench: Path | None = typer.Option(None, help="Or: take bits/token from a bench --json file."),
    attacker_share: float = typer.Option(1.0, help="Share of uplink bytes an attacker can use."),
    days: float = typer.Option(365.0, help="How long the service runs."),
    lifetime_budget: float | None = typer.Option(None, help="Lifetime upload budget, bytes."),
    per_day_budget: float | None = typer.Option(None, help="Per-day upload budget, bytes."),
    target_days: float | None = typer.Option(None, help="Budget needed to hold out this long."),
    plot: Path | None = typer.Option(None, help="Also draw time to exfiltrate (PNG file)."),
) -> None:
    """The seed post's arithmetic: upload volume, time to exfiltrate, budgets (uplimit.plan)."""
    import json

    from uplimit.errors import ConfigError
    from uplimit.plan import Plan, budget_for
    from uplimit.plan import plan as compute
    from uplimit.plan import weights_bytes as from_parameters

    if (weights_bytes is None) == (parameters is None):
        raise ConfigError("give --weights-bytes or --parameters (with --bytes-per-parameter)")
    weights = weights_bytes or from_parameters(parameters, bytes_per_parameter)
    if bench is not None:
        bits_per_token = json.loads(bench.read_text())["bits_per_token"]
    if bits_per_token is None:
        raise ConfigError("give --bits-per-token or --bench")
    p = Plan(weights, tokens_per_day, bits_per_token, attacker_share, days,
             lifetime_budget, per_day_budget)  # fmt: skip
    r = compute(p)
    table = Table("", "value", title="uplimit plan")
    table.add_row("weights", f"{weights:.3g} bytes")
    table.add_row("bits per token", f"{bits_per_token:g}")
    table.add_row("uploaded per day", f"{r.upload_bytes_per_day:.3g} bytes")
    table.add_row(f"uploaded in {days:g} days", f"{r.upload_bytes_total:.3g} bytes "
                  f"({100 * r.upload_fraction_of_weights:.3g} % of the weights)")  # fmt: skip
    table.add_row("attacker's rate", f"{r.attacker_bytes_per_day:.3g} bytes/day")
    table.add_row("time to exfiltrate at that rate", f"{r.days_to_exfiltrate:.3g} days "
                  f"({r.days_to_exfiltrate / 365.25:.3g} years)")  # fmt: skip
    if r.lifetime_stops_attacker is not None:
        verdict = "never: the lifetime budget stops it" if r.lifetime_stops_attacker else "yes"
        table.add_row("can the weights get out?", f"{verdict} (at most "
                      f"{100 * r.attacker_max_fraction:.3g} % of them)")  # fmt: skip
    if r.budget_fits_traffic is not None:
        table.add_row("budgets fit the honest traffic", "yes" if r.budget_fits_traffic else "NO")
    if target_days is not None:
        need = budget_for(p, target_days)
        table.add_row(f"per-day budget for {target_days:g} days", f"{need.per_day_bytes:.3g} "
                      f"bytes ({need.headroom:.3g} x the honest traffic)")  # fmt: skip
        table.add_row("lifetime budget that never lets them out", f"< {need.lifetime_bytes:.3g}")
    Console().print(table)
    if plot is not None:
        from uplimit.plan_plot import plot_plan

        plot_plan(p, plot)
        Console().print(f"plot: {plot}")


@app.command(rich_help_panel="Measure")
def load(
    prompts: Path = typer.Option(..., help="JSONL file: one {id, messages} per line."),
    url: str = typer.Option("http://127.0.0.1:8000", help="The outer side's API."),
    clients: str = typer.Option("1,4,16", help="Comma-separated load levels: concurrent clients."),
    requests: int = typer.Option(4, help="Requests each client sends, one after another."),
    max_tokens: int = typer.Option(64, help="Tokens per answer at most."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    model: str = typer.Option("uplimit", help="The model name the outer serves."),
    api_key: str | None = typer.Option(None, envvar="UPLIMIT_API_KEY", help="The API key."),
    admin_key: str | None = typer.Option(
        None, envvar="UPLIMIT_ADMIN_KEY", help="The admin key, for /status.json (if it wants one)."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write every level's figures here."),
) -> None:
    """Drive a running deployment with N concurrent streaming clients and measure it.

    Per level: answers, errors, tokens/s, the tokens' own code (payload) and everything the
    budget was charged meanwhile (all-in) in bits per token, and time to first text and
    between chunks (p50, p95). Measure on a deployment of your own: other traffic is charged too.
    """
    import asyncio
    import json

    from uplimit.errors import ConfigError
    from uplimit.load import LoadSettings, run_load
    from uplimit.prompts import load_jsonl

    try:
        levels = [int(c) for c in clients.split(",")]
    except ValueError as e:
        raise ConfigError(f"--clients: comma-separated integers, got {clients!r}") from e
    records = load_jsonl(prompts)
    table = Table(
        "clients", "answers", "errors", "tok/s", "payload b/t", "all-in b/t", "all-in/payload",
        "TTFT p50/p95 s", "between p50/p95 s", title=f"uplimit load: {url}, T={temperature}",
    )  # fmt: skip
    results = []
    for n in levels:
        settings = LoadSettings(
            url, n, requests, max_tokens, temperature, model, api_key, admin_key
        )
        with counter_bar(f"{n} clients") as update:
            done = 0

            def answered(answer, total=n * requests) -> None:
                nonlocal done
                done += 1
                update(answer.error or "", done, total)

            summary = asyncio.run(run_load(settings, records, on_answer=answered)).summary()
        results.append(summary)
        table.add_row(
            str(n), str(summary["answers"]), str(summary["errors"]),
            _fmt(summary["tokens_per_s"], ".1f"), _fmt(summary["payload_bits_per_token"], ".3f"),
            _fmt(summary["all_in_bits_per_token"], ".3f"),
            _fmt(summary["all_in_over_payload"], ".2f"),
            _pair(summary["ttft_s"]), _pair(summary["between_chunks_s"]),
        )  # fmt: skip
    Console().print(table)
    if json_out:
        json_out.write_text(json.dumps({"url": url, "levels": results}, indent=2))
        console.print(f"wrote {json_out}")
    if any(r["errors"] for r in results):
        raise typer.Exit(1)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pair(p: dict[str, float] | None) -> str:
    return "-" if p is None else f"{p['p50']:.2f} / {p['p95']:.2f}"
