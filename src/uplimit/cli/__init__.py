"""The `uplimit` command: thin modules that translate the command line to the library.

    common    the root command, the console, progress bars, loading a service's models
    models    models fetch | list
    research  bench, quality, speed, calibrate, plan, load
    serve     serve inner | outer | both | verifier, rollout, demo
    operate   meters, budget show | raise, audit list | show
    keys      keys add | list | revoke
    gauge     gauge apply | export | verify
    distill   distill prompts | collect | train
    redteam   redteam

Errors are mapped once, here (`main`): uplimit's own (`UplimitError`) and the foreign ones a
command meets at its boundary (a file it cannot read, an HTTP peer it cannot reach) end the
command with a one-line message and exit status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import sys

# isort: off
# Registered on import, and `uplimit --help` lists them in this order: serving first.
from uplimit.cli import serve, research, redteam, operate, keys, models, gauge, distill

# isort: on
from uplimit.cli.common import app, console
from uplimit.errors import UplimitError

__all__ = ["app", "main"]

_COMMANDS = (serve, research, redteam, operate, keys, models, gauge, distill)


def _message(e: BaseException) -> str | None:
    """The one-line message for an error the user can act on; None for a bug."""
    if isinstance(e, UplimitError):
        return str(e)
    httpx = sys.modules.get("httpx")  # only a command that used it can have raised its errors
    if httpx is not None and isinstance(e, httpx.HTTPError):
        where = f" ({e.request.url})" if isinstance(e, httpx.RequestError) else ""
        return f"HTTP: {e}{where}"
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return None


def main() -> None:
    try:
        app()
    except Exception as e:
        message = _message(e)
        if message is None:
            raise
        console.print(f"[red]error:[/red] {message}")
        raise SystemExit(2) from e
