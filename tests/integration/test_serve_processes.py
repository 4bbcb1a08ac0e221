"""`uplimit serve` commands as separate processes, on the tiny pair.

The spot-check verifier in real serving: `serve outer`, `serve inner` and `serve verifier`,
every stream checked (verify_rate 1). Honest traffic at T = 0 and 0.7 (n > 1, best_of 2, a stop
sequence) gives verdicts that all agree and no alarm; then, with the same verifier still
running, a new outer and a dishonest inner (the red team's steganographic scheduler behind the
real `serve inner` command) give disagreements, logged and counted as alarms.

Stopping: SIGTERM to `serve both` while a request is still generating ends the process cleanly
(the request is cut after the grace period, SHUTDOWN goes down, the inner ends)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx

from support.config import link_files, tiny_models, write_config
from support.net import free_port
from support.processes import UPLIMIT, Processes, healthy, metric
from uplimit.inner.confine import UNCONFINED_ALARM

# `uplimit serve inner` with the red team's dishonest scheduler swapped in: nothing in the
# command or its configuration can do this (docs/security.md); a test can.
_DISHONEST_INNER = """
import functools, sys
import uplimit.inner.serve as serve
from uplimit.redteam.stego import StegoScheduler, TokenStego

honest = serve.InnerService

def dishonest(strong, weak, *args, **kwargs):
    stego = TokenStego(bytes(range(7, 255, 3)))  # the bits it hides
    kwargs["scheduler"] = functools.partial(StegoScheduler, weak=weak, stego=stego)
    return honest(strong, weak, *args, **kwargs)

serve.InnerService = dishonest
from uplimit.cli import main
sys.argv = ["uplimit", "serve", "inner", "--unconfined", "--config", sys.argv[1]]
main()
"""


def _complete(url: str, **body) -> dict:
    body = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 16, **body}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_honest_streams_agree_and_a_dishonest_inner_is_caught(tiny_pair_dirs, tmp_path):
    port, outer_metrics, verifier_port, verifier_metrics = (free_port() for _ in range(4))
    verdicts = tmp_path / "verdicts.jsonl"
    config = tmp_path / "uplimit.toml"
    write_config(config, {
        "models": tiny_models(tiny_pair_dirs),
        "coding": {"frame_tokens": 4, "max_streams": 8, "max_context": 256},
        "link": {"downlink_port": free_port(), "uplink_port": free_port(), "tick_s": 0.02,
                 "max_latency_s": 0, "lifetime_budget_bytes": 1000000, **link_files(tmp_path)},
        "inner": {"max_batch": 4},
        "outer": {"port": port, "metrics_port": outer_metrics, "model_name": "tiny",
                  "verifier": f"127.0.0.1:{verifier_port}", "verify_rate": 1.0},
        "verifier": {"port": verifier_port, "verdicts": verdicts,
                     "metrics_port": verifier_metrics},
    })  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    outer_url = f"http://127.0.0.1:{outer_metrics}/metrics"
    verifier_url = f"http://127.0.0.1:{verifier_metrics}/metrics"
    cfg = ["--config", str(config)]
    procs = Processes(tmp_path)

    def lines() -> list[dict]:
        return (
            [json.loads(x) for x in verdicts.read_text().splitlines()] if verdicts.exists() else []
        )

    try:
        procs.init_ledger(config)
        procs.start("verifier", [UPLIMIT, "serve", "verifier", *cfg])
        procs.start("outer", [UPLIMIT, "serve", "outer", *cfg])  # before the verifier listens:
        # Unconfined: the tiny pair lies where only root can read it (test_confined_inner.py)
        procs.start("inner", [UPLIMIT, "serve", "inner", "--unconfined", *cfg])
        procs.wait_for(lambda: "listening on" in procs.log("verifier"), "the verifier")
        procs.wait_for(lambda: healthy(url), "the link")

        # Honest traffic: 5 streams, every one sent to the verifier.
        _complete(url, temperature=0.0)
        _complete(url, temperature=0.7, seed=3, n=2, best_of=2)
        stopped = _complete(url, temperature=0.7, seed=9, stop=["e"])
        _complete(url, temperature=0.7, seed=11, max_tokens=24)
        procs.wait_for(lambda: len(lines()) == 5, "5 verdicts", 120)
        honest = lines()
        assert all(v["agree"] for v in honest), honest
        assert sorted(v["checked_tokens"] > 0 for v in honest) == [True] * 5
        assert {v["seed"] for v in honest} >= {3, 9, 11}
        assert stopped["choices"][0]["finish_reason"] in ("stop", "length")
        assert metric(outer_url, "uplimit_spotchecks_total", 'outcome="sent"') == 5
        assert metric(outer_url, "uplimit_alarms_total", 'kind="verifier"') == 0
        assert metric(verifier_url, "uplimit_checks_total", 'outcome="agree"') == 5
        assert metric(verifier_url, "uplimit_alarms_total", 'kind="spotcheck"') == 0
        assert "ALARM" not in procs.log("verifier") + procs.log("outer")

        # One link serves one inner: stop both, then a new outer and a dishonest inner.
        # SIGTERM: the outer exits cleanly after sending SHUTDOWN, so the inner stops too.
        assert procs.stop("outer") == 0
        procs.wait_for(lambda: procs.procs["inner"].poll() is not None, "the inner to stop", 60)
        assert procs.procs.pop("inner").returncode == 0
        assert "link ended (shutdown)" in procs.log("inner")
        procs.start("outer2", [UPLIMIT, "serve", "outer", *cfg])
        procs.start("dishonest", [sys.executable, "-c", _DISHONEST_INNER, str(config)])
        procs.wait_for(lambda: healthy(url), "the second link")
        for seed in (1, 2):
            _complete(url, temperature=0.7, seed=seed, n=3)
        procs.wait_for(lambda: len(lines()) == 11, "6 more verdicts", 120)
        caught = [v for v in lines()[5:] if not v["agree"]]
        assert caught, lines()[5:]
        assert all(v["first_difference"] < v["checked_tokens"] for v in caught)
        alarms = metric(verifier_url, "uplimit_alarms_total", 'kind="spotcheck"')
        assert alarms == len(caught) == metric(verifier_url, "uplimit_checks_total",
                                                'outcome="disagree"')  # fmt: skip
        assert procs.log("verifier").count("ALARM spotcheck") == len(caught)
        assert metric(verifier_url, "uplimit_alarms_total", 'kind="protocol"') == 0
    finally:
        procs.stop_all()


def test_sigterm_with_a_request_in_flight_stops_serve_both_cleanly(tiny_pair_dirs, tmp_path):
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "uplimit.toml"
    # One token per half-second frame: the request below would run for minutes.
    write_config(config, {
        "models": tiny_models(tiny_pair_dirs),
        "coding": {"frame_tokens": 1, "max_context": 512},
        "link": {"downlink_port": free_port(), "uplink_port": free_port(), "tick_s": 0.5,
                 "max_latency_s": 0, "lifetime_budget_bytes": 1000000,
                 "secret_file": tmp_path / "made-by-both"},
        "outer": {"port": port, "metrics_port": metrics_port, "model_name": "tiny"},
    })  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    procs = Processes(tmp_path)
    try:
        procs.init_ledger(config)
        procs.start("both", [UPLIMIT, "serve", "both", "--unconfined", "--config", str(config)])
        procs.wait_for(lambda: healthy(url), "the link")
        body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 400, "temperature": 1.0}
        client = subprocess.Popen(  # a non-streaming request that will not finish by itself
            [sys.executable, "-c", f"import httpx; httpx.post('{url}/v1/completions',"
             f" json={body!r}, timeout=600)"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # In flight: its first tokens have been decoded (it is the only request).
        procs.wait_for(lambda: metric(metrics, "uplimit_tokens_total") > 0, "the first tokens")
        assert client.poll() is None  # still waiting for its answer
        started = time.monotonic()
        assert procs.stop("both", timeout_s=120) == 0
        assert time.monotonic() - started < 100  # not the minutes the answer would take
        client.kill()
        client.wait()
        assert "timeout graceful shutdown exceeded" in procs.log("both")  # cut, not finished
        assert (tmp_path / "made-by-both").stat().st_mode & 0o777 == 0o600  # the link's secret
        # The link ended by SHUTDOWN, not by failing: the one ALARM says it ran unconfined.
        assert [x for x in procs.log("both").splitlines() if "ALARM" in x] == [UNCONFINED_ALARM], (
            procs.log("both")
        )
    finally:
        procs.stop_all()
