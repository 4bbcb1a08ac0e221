"""What the command modules share: the root command, the console, progress bars."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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

from uplimit.config import Config
from uplimit.models.base import LanguageModel
from uplimit.progress import Progress as ProgressCallback

__all__ = ["CONFIG_HELP", "app", "console", "counter_bar", "load_service_models", "progress_bar"]

app = typer.Typer(
    help="Serve a strong language model through a narrow, metered upload link.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
CONFIG_HELP = "TOML config file (docs/serving.md); UPLIMIT_<SECTION>_<KEY> overrides it."
console = Console(stderr=True)


@contextmanager
def progress_bar() -> Iterator[ProgressCallback]:
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


@contextmanager
def counter_bar(what: str) -> Iterator[ProgressCallback]:
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


def load_service_models(config: Config, which: tuple[str, ...]) -> dict[str, LanguageModel]:
    """The models a service needs, loaded with the `[models]` settings (a pair is checked)."""
    from uplimit.models.loading import ModelPair, load_configured

    m = config.models
    with console.status(f"loading the {' and '.join(which)} model(s)"):
        loaded = {role: load_configured(getattr(m, role), m) for role in which}
    if len(which) == 2:
        ModelPair(loaded["strong"], loaded["weak"])  # checks the shared tokenizer
    return loaded
