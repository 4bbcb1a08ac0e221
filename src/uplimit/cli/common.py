"""What the command modules share: the root command, the console, progress bars."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
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

__all__ = [
    "CONFIG_HELP",
    "LineProgress",
    "app",
    "console",
    "counter_bar",
    "load_service_models",
    "progress_bar",
]

app = typer.Typer(
    help="Serve a strong language model through a narrow, metered upload link.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
CONFIG_HELP = "TOML config file (docs/serving.md); UPLIMIT_<SECTION>_<KEY> overrides it."
console = Console(stderr=True)


class LineProgress:
    """Progress as plain lines, for a console that is not a terminal (nohup, a CI log), where a
    live bar would print nothing until the end: a line when a phase starts, finishes or starts
    over, and otherwise at most one per phase every `every_s` seconds.

    Without `name`, the callbacks' `what` names the phase (as `progress_bar` draws a bar per
    phase); with it, there is one phase, `name`, and `what` is a note on it (`counter_bar`)."""

    def __init__(
        self,
        write: Callable[[str], None],
        name: str | None = None,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write, self._name, self._every_s, self._clock = write, name, every_s, clock
        self._shown: dict[str, tuple[float, bool]] = {}  # phase: (last line's time, finished)

    def __call__(self, what: str, done: int, total: int) -> None:
        phase = self._name if self._name is not None else what
        now, finishing = self._clock(), total > 0 and done >= total
        if phase in self._shown:
            last, finished = self._shown[phase]
            if finished == finishing and (finished or now - last < self._every_s):
                return  # a finished phase once; a running one at most every `every_s`
        self._shown[phase] = (now, finishing)
        line = f"{phase}: {done:,}"
        if total > 0:
            line += f" of {total:,} ({100 * done / total:.0f} %)"
        self._write(line + (f", {what}" if self._name is not None and what else ""))


def _lines(name: str | None = None) -> LineProgress:
    return LineProgress(lambda line: console.print(line, markup=False, highlight=False), name)


@contextmanager
def progress_bar() -> Iterator[ProgressCallback]:
    """A rich progress bar driven by (what, done, total) callbacks (lines where no terminal)."""
    if not console.is_terminal:
        yield _lines()
        return
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
    if not console.is_terminal:
        yield _lines(what)
        return
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
