"""`uplimit gauge apply|export|verify`: new weights, same function (docs/gauge.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from uplimit.cli.common import (
    app,
    console,
)

gauge_app = typer.Typer(
    help="Gauge transforms: new weights, same function (docs/gauge.md).", no_args_is_help=True
)
app.add_typer(gauge_app, name="gauge", rich_help_panel="Models")


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
