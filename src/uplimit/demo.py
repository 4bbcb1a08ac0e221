"""`uplimit demo`: the real model pair, a few prompts, every uploaded bit shown.

Until the services exist (inner and outer processes over a metered link), the demo runs
the codec end to end in one process: the strong model answers, the answers are coded in
frames against the weak model, a separately loaded weak model decodes them, and the
demo prints what crossed and what gzip would have needed for the same text.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from uplimit.bench import BenchSettings, run_bench
from uplimit.coding.calibration import Calibration
from uplimit.coding.sampling import SamplingParams
from uplimit.models.base import LanguageModel
from uplimit.models.chat import Message
from uplimit.prompts import Prompt

DEFAULT_BUDGET_FRACTION = 0.01  # the link issue's default lifetime budget: 1 % of the weights

# Written for the demo; not taken from any benchmark or training set.
DEMO_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "What does the HTTP status code 503 mean?",
    "Give a one-line shell command that counts the lines of all .py files in a directory.",
)


def run_demo(
    strong: LanguageModel,
    weak_encoder: LanguageModel,
    weak_decoder: LanguageModel,
    calibration: Calibration,
    console: Console,
    progress: Callable[[str, int, int], None],
    max_tokens: int = 96,
) -> None:
    prompts = [
        Prompt(f"demo-{i}", (Message(role="user", content=text),))
        for i, text in enumerate(DEMO_PROMPTS)
    ]
    total_bits = total_tokens = seconds = 0.0
    for temperature in (0.0, 0.7):
        settings = BenchSettings(SamplingParams(temperature=temperature), max_tokens)
        result = run_bench(
            prompts, settings, strong, weak_encoder, weak_decoder, calibration, progress
        )
        for prompt, row in zip(prompts, result["per_response"], strict=True):
            body = (
                f"[bold]{prompt.messages[0]['content']}[/bold]\n\n{row['text']}\n\n"
                f"[cyan]{row['tokens']} tokens, {row['bits']:.0f} bits uploaded "
                f"({row['bits'] / max(row['tokens'], 1):.2f} bits/token); "
                f"gzip would need {row['gzip_bits']} bits[/cyan]"
            )
            console.print(Panel(body, title=f"T = {temperature}", expand=False))
        if not result["exact_roundtrip"]:
            console.print("[red]decoded text differs from the strong model's output[/red]")
        total_bits += result["bits_per_token"] * result["tokens"]
        total_tokens += result["tokens"]
        seconds += result["tokens"] / result["strong_tokens_per_s"]
    console.print(summary(total_bits, total_tokens, seconds, Path(strong.info.path).stat().st_size))


def summary(bits: float, tokens: float, seconds: float, weights_bytes: int) -> Table:
    """What the demo uploaded, against the weights and the default lifetime budget."""
    budget_bits = 8 * weights_bytes * DEFAULT_BUDGET_FRACTION
    per_token = bits / max(tokens, 1)
    rate = bits / max(seconds, 1e-9)  # upload bits per second while serving at this pace
    table = Table("summary", "value", title="what crossed the uplink")
    table.add_row("tokens served", f"{tokens:.0f}")
    table.add_row("bits uploaded (frames, all-in)", f"{bits:.0f} ({bits / 8:.0f} bytes)")
    table.add_row("bits per token", f"{per_token:.3f}")
    table.add_row("strong weights", f"{weights_bytes:,} bytes")
    table.add_row(
        f"lifetime budget ({100 * DEFAULT_BUDGET_FRACTION:g} % of the weights)",
        f"{budget_bits / 8:,.0f} bytes; this demo used {100 * bits / budget_bits:.5f} %",
    )
    table.add_row("tokens that budget serves at this rate", f"{budget_bits / per_token:,.0f}")
    table.add_row(
        "an attacker owning the whole uplink, at this pace",
        f"{8 * weights_bytes / rate / 86400 / 365:,.1f} years for the weights "
        f"({rate:.1f} bits/s); the budget stops them at "
        f"{100 * DEFAULT_BUDGET_FRACTION:g} % of the weights",
    )
    return table
