"""`uplimit redteam`: attack a live system on loopback (red-team mode, only here)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from uplimit.cli.common import (
    app,
    console,
)


@app.command(rich_help_panel="Measure")
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


@app.command(rich_help_panel="Measure")
def roc(
    out: Path = typer.Option(..., help="Directory for traces.jsonl, roc.json, roc.md and roc.png."),
    prompts: int = typer.Option(250, help="Training prompts: one honest stream per prompt and T."),
    stego_prompts: int = typer.Option(50, help="Prompts that also get a stego stream per rate."),
    max_tokens: int = typer.Option(32, help="Tokens per stream."),
    batch: int = typer.Option(32, help="Prompts generated side by side."),
    check_rate: float = typer.Option(0.05, help="The spot-check's share of streams re-run."),
    strong: str = typer.Option("strong", help="Strong model: 'strong', a GGUF file or HF dir."),
    weak: str = typer.Option("weak", help="Weak model: 'weak', a GGUF file or HF dir."),
    threads: int = typer.Option(1, help="llama.cpp threads per model; 0: all cores."),
    analyse_only: bool = typer.Option(
        False, help="Analyse OUT/traces.jsonl as it stands (a run stopped early); no models."
    ),
) -> None:
    """Detection against false alarms of the bits/token monitor and the spot-check, on
    steganography at 0.05-0.5 bits/token (docs/security.md). Resumes from OUT/traces.jsonl."""
    from uplimit.cli.common import progress_bar
    from uplimit.coding.calibration import for_pair
    from uplimit.models.loading import ModelPair, load_model
    from uplimit.redteam.roc import (
        RocSettings,
        analyse,
        markdown,
        plot_roc,
        read_traces,
        run_traces,
    )

    settings = RocSettings(prompts, stego_prompts, max_tokens, batch)
    out.mkdir(parents=True, exist_ok=True)
    if analyse_only:
        traces = read_traces(out / "traces.jsonl")
    else:
        options = {"n_threads": threads} if threads else {}
        with console.status("loading models"):
            pair = ModelPair(load_model(strong, **options), load_model(weak, **options))
        s, w = pair.strong, pair.weak
        calibration = for_pair(s.info.file_sha256, w.info.file_sha256)
        with progress_bar() as update:
            traces = run_traces(
                s, w, calibration, settings, out / "traces.jsonl",
                progress=lambda done, total: update("streams", done, total),
            )  # fmt: skip
    result = analyse(traces, settings, sorted({check_rate, 1.0}))
    (out / "roc.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "roc.md").write_text(markdown(result))
    plot_roc(traces, settings, check_rate, out / "roc.png")
    console.print(markdown(result))
    console.print(f"wrote {out / 'roc.json'}, {out / 'roc.md'} and {out / 'roc.png'}")
