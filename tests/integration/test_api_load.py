"""The API under load (#16 item 7), the short version: locust users mixing valid requests
(whole and streamed) with invalid ones against the served tiny pair, over real sockets and the
real transport. No answer may be lost (a 5xx, a dropped connection, a cut stream), and the
link serves throughout.

Locust runs as a process of its own (it patches the standard library with gevent). Longer
runs: UPLIMIT_LOAD_USERS (default 64) and UPLIMIT_LOAD_S (default 15); UPLIMIT_LOAD_PAIR=real
serves the real pair instead of the tiny one (`make load-api`); the figures are printed.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from support.api_stack import api_config, served_api

LOCUSTFILE = Path(__file__).parent.parent / "load" / "locustfile.py"
KEY = "sk-load-0123456789"


def test_no_answer_is_lost_under_load(tiny_pair_dirs, request, tmp_path):
    users = int(os.environ.get("UPLIMIT_LOAD_USERS", "64"))
    seconds = int(os.environ.get("UPLIMIT_LOAD_S", "15"))
    if os.environ.get("UPLIMIT_LOAD_PAIR", "tiny") == "real":
        strong, weak = request.getfixturevalue("real_strong"), request.getfixturevalue("real_weak")
        pair = {
            "models": {"strong": "strong", "weak": "weak"},
            "coding": {"frame_tokens": 16, "max_streams": 16, "max_context": 512},
            "link": {"tick_s": 0.1},
            # What two cores answer in a minute or two: past it a 429 with Retry-After.
            "outer": {"api_key": KEY, "max_requests": 32},
        }
    else:
        strong, weak = request.getfixturevalue("tiny_strong"), request.getfixturevalue("tiny_weak")
        pair = {"outer": {"api_key": KEY}}
    config = api_config(tiny_pair_dirs, tmp_path, **pair)
    health: list[int] = []
    with served_api(config, strong, weak) as url:
        done = threading.Event()

        def watch() -> None:  # the link's state, every 0.5 s, from outside
            with httpx.Client(timeout=30) as http:
                while not done.wait(0.5):
                    health.append(http.get(f"{url}/health").status_code)

        watcher = threading.Thread(target=watch)
        watcher.start()
        env = {
            **os.environ,
            "UPLIMIT_LOAD_KEY": KEY,
            "UPLIMIT_LOAD_MODEL": "tiny",
            "UPLIMIT_LOAD_STATUS": str(tmp_path / "statuses.json"),
        }
        try:
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "locust",
                    "-f",
                    str(LOCUSTFILE),
                    "--headless",
                    "--host",
                    url,
                    "-u",
                    str(users),
                    "-r",
                    str(users),
                    "-t",
                    f"{seconds}s",
                    "--stop-timeout",
                    "600",
                    "--csv",
                    str(tmp_path / "load"),
                    "--only-summary",
                    "--exit-code-on-error",
                    "0",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=seconds + 900,
            )
        finally:
            done.set()
            watcher.join()
        assert run.returncode == 0, run.stderr[-3000:]
        assert httpx.get(f"{url}/health").status_code == 200
    with (tmp_path / "load_stats.csv").open() as f:
        total = next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")
    statuses = json.loads((tmp_path / "statuses.json").read_text())
    requests, lost = int(total["Request Count"]), int(total["Failure Count"])
    print(
        f"\nload: {users} users for {seconds} s: {requests} requests, lost {lost}, "
        f"by status {dict(sorted(statuses.items()))}, p95 {total['95%']} ms, "
        f"/health {health.count(200)}/{len(health)} serving"
    )
    failures = (tmp_path / "load_failures.csv").read_text()
    assert lost == 0, failures
    assert requests >= users  # every user was answered at least once
    assert {"200", "400", "404"} <= set(statuses)
    assert health and all(status == 200 for status in health)
