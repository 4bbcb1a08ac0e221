"""Waiting in tests: on a condition with a deadline that fails, never on a guessed sleep.

A wait that runs out raises `AssertionError` naming what it waited for, so a slow or broken
system fails the test instead of letting it carry on in a state it did not check.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

import httpx

POLL_S = 0.02


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = 60.0
) -> None:
    """Poll `condition` (plain or async) until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(POLL_S)


async def wait_healthy(url: str, *, serving: bool = True, timeout_s: float = 60.0) -> None:
    """Until the outer at `url` serves (with serving=False: until its API answers at all,
    which means it listens for the inner too)."""
    async with httpx.AsyncClient(timeout=5) as http:

        async def up() -> bool:
            try:
                return (await http.get(f"{url}/health")).status_code == 200 or not serving
            except httpx.TransportError:
                return False

        await eventually(up, f"{url}/health", timeout_s)


async def stop_task(task: asyncio.Task) -> None:
    """Cancel `task` and wait for it to end. An error it raised while stopping is raised
    here, not discarded as `gather(..., return_exceptions=True)` would."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()
