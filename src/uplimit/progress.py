"""How long-running library calls report progress: one callback shape for all of them.

`Progress(what, done, total)`: `what` names the phase (the CLI shows a bar per phase) or
carries a note on the current one, such as a running loss; `done` of `total` units.
"""

from collections.abc import Callable

__all__ = ["Progress"]

Progress = Callable[[str, int, int], None]
