"""Memory stays bounded (#16 item 8): streams through the served tiny pair (`serve_outer` +
`serve_inner` over the real transport, HTTP in front, the bits/token monitor on), and the
Python heap of that process (both sides) measured with tracemalloc after each tenth of them.

A traced warm-up fills what is bounded by design (the encoder's resend history of 256 frames,
pools, caches) before the first figure. The suite runs 800 streams from one client, 4 a
request (`n`); `make memory` runs 100,000 from 16 clients (UPLIMIT_MEMORY_STREAMS,
UPLIMIT_MEMORY_CLIENTS) and prints the table. What a finished stream leaves behind shows as a
slope: 100 bytes a stream is 72 kB over the suite's run.
"""

from __future__ import annotations

import gc
import os
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from support.api_stack import api_config, served_api
from uplimit.outer.monitor import Allowance, MonitorThresholds

# A warm-up of as many streams, at the same concurrency, fills the resend history with frames
# of the shape the run makes (one client: one request's streams a frame).
WARM_UP = 1200
# Growth of the traced heap allowed from the first tenth to the end: the noise of pools and
# free lists (up to 61 kB seen in a full-suite run), not a per-stream cost.
ALLOWED_GROWTH = 64 * 1024
CHOICES = 4  # streams a request (`n`): fewer HTTP round trips a stream


def test_memory_is_flat_over_many_streams(tiny_pair_dirs, tiny_strong, tiny_weak, tmp_path):
    streams = int(os.environ.get("UPLIMIT_MEMORY_STREAMS", "800"))
    clients = int(os.environ.get("UPLIMIT_MEMORY_CLIENTS", "1"))
    warm_up = max(WARM_UP, streams // 10)
    thresholds = tmp_path / "monitor.json"
    MonitorThresholds(Allowance(64.0, 16.0), Allowance(64.0, 16.0)).save(thresholds)
    config = api_config(
        tiny_pair_dirs,
        tmp_path,
        outer={"monitor": str(thresholds), "max_requests": 4 * clients},
        link={"tick_s": 0.005},
        coding={"max_streams": 16},
    )
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 2, "n": CHOICES}
    with (
        served_api(config, tiny_strong, tiny_weak) as url,
        httpx.Client(
            base_url=url, timeout=60, limits=httpx.Limits(max_connections=clients)
        ) as http,
        ThreadPoolExecutor(clients) as pool,
    ):

        def ask(_: int) -> int:
            return http.post("/v1/completions", json=body).status_code

        def run(n_streams: int) -> None:
            assert set(pool.map(ask, range(n_streams // CHOICES))) == {200}

        tenth = max(CHOICES, streams // 10)
        tracemalloc.start()  # before the warm-up: a block freed untraced is not subtracted
        rows = []
        try:
            run(warm_up)
            print("\nstreams  traced heap (kB)  RSS (MB)")
            for done in range(tenth, streams + 1, tenth):
                run(tenth)
                gc.collect()
                rows.append((done, tracemalloc.get_traced_memory()[0], _rss_mb()))
                print(f"{done:>7,}  {rows[-1][1] / 1024:>16,.0f}  {rows[-1][2]:>8,}", flush=True)
        finally:
            tracemalloc.stop()
    growth = rows[-1][1] - rows[0][1]
    per_stream = growth / (rows[-1][0] - rows[0][0])
    print(f"growth after the first tenth: {growth / 1024:,.0f} kB, {per_stream:.1f} B/stream")
    assert growth < ALLOWED_GROWTH, rows


def _rss_mb() -> int:
    """This process's resident memory now (not its peak)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
