"""The served system in a thread of its own: `serve_outer` and `serve_inner` on the tiny pair,
over the real transport (two TCP connections, metered), as `uplimit serve both` runs them.

Tests talk to it with plain blocking clients (httpx, raw sockets, the openai package), so
hypothesis and a test's own event loop stay out of the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from support.config import init_ledger_for, link_files, tiny_models, write_config
from support.net import free_port
from support.waiting import stop_task, wait_healthy
from uplimit.config import Config
from uplimit.inner.serve import serve_inner
from uplimit.models.base import LanguageModel
from uplimit.outer.serve import serve_outer

__all__ = ["api_config", "served_api"]


def api_config(
    pair_dirs: tuple[Path, Path],
    directory: Path,
    *,
    outer: Mapping[str, object] | None = None,
    link: Mapping[str, object] | None = None,
    coding: Mapping[str, object] | None = None,
    models: Mapping[str, object] | None = None,
) -> Config:
    """The tiny pair's services (or `models`') with free ports and files under `directory`;
    each mapping's keys are added to (or replace) that section's."""
    return write_config(
        directory / "uplimit.toml",
        {
            "models": models or tiny_models(pair_dirs),
            "coding": {"frame_tokens": 4, "max_streams": 8, "max_context": 256, **(coding or {})},
            "link": {
                "downlink_port": free_port(),
                "uplink_port": free_port(),
                "tick_s": 0.02,
                "lifetime_budget_bytes": 10_000_000,
                **link_files(directory),
                **(link or {}),
            },
            "inner": {"max_batch": 4, "audit": directory / "audit.db"},
            "outer": {
                "model_name": "tiny",
                "port": free_port(),
                "metrics_port": 0,
                **(outer or {}),
            },
        },
    )


@contextlib.contextmanager
def served_api(
    config: Config,
    strong: LanguageModel,
    weak: LanguageModel,
    *,
    inner_config: Config | None = None,
    serving: bool = True,
    stop_inner: list[Callable[[], None]] | None = None,
) -> Iterator[str]:
    """Serve both sides until the block ends; yields the API's base URL (no /v1). The inner
    runs `inner_config` when given (a mismatched pair); `serving` False: do not wait for the
    link to serve, only for the API to answer. `stop_inner` gets a function that stops the
    inner side now (as a signal would), from any thread."""
    url = f"http://127.0.0.1:{config.outer.port}"
    init_ledger_for(inner_config or config)  # as `uplimit budget init` would, once
    ready = threading.Event()
    stop: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
    failure: list[BaseException] = []

    async def main() -> None:
        stopped = asyncio.Event()
        stop.append((asyncio.get_running_loop(), stopped))
        outer = asyncio.create_task(serve_outer(config, weak))
        inner = asyncio.create_task(serve_inner(inner_config or config, strong, weak))
        if stop_inner is not None:
            loop = asyncio.get_running_loop()
            stop_inner.append(lambda: loop.call_soon_threadsafe(inner.cancel))
        try:
            await wait_healthy(url, serving=serving)
            ready.set()
            await stopped.wait()
        finally:
            await stop_task(outer)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(inner, 30)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # the test's thread raises it
            failure.append(e)
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="served-api", daemon=True)
    thread.start()
    ready.wait(120)
    if failure or not stop:
        raise RuntimeError("the served API did not start") from (failure or [None])[0]
    try:
        yield url
    finally:
        loop, stopped = stop[0]
        loop.call_soon_threadsafe(stopped.set)
        thread.join(60)
        if failure:
            raise failure[0]
