"""`uplimit serve inner` as root confines itself: real processes, a real network namespace with
its nftables quota, a real unprivileged user, the charge-only ledger over a unix socket.

The tiny pair, the configuration and the files live in a directory the inner's user can read
(pytest's own are root's only); the ledger has a directory of its own that the user cannot
write. Without root and nft the command refuses to start unless --unconfined is given, which
raises an ALARM and shows `uplimit_inner_confined 0` at the outer.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.config import tiny_models, write_config
from support.net import free_port
from uplimit.inner.confine import UNCONFINED_ALARM
from uplimit.link.auth import create_secret
from uplimit.link.confine import kernel_quota_bytes
from uplimit.link.kernel import available

UPLIMIT = str(Path(sys.executable).with_name("uplimit"))
BUDGET = 1_000_000
SLOW = 240.0


@pytest.fixture
def world(missing) -> Iterator[tuple[Path, Path, dict[str, str]]]:
    """(directory, config file, environment): a readable tree with the tiny pair."""
    can = available()
    if not can.ok:
        missing("kernel", f"confinement needs the kernel meter: {can.reason}")
    from uplimit.models.tiny import build_tiny_pair

    base = Path(tempfile.mkdtemp(prefix="uplimit-confine-"))
    base.chmod(0o755)
    (base / "ledger").mkdir()
    pair = build_tiny_pair(base / "pair")
    subprocess.run(["chmod", "-R", "a+rX", str(base / "pair")], check=True)  # weights are 0600
    name = f"t{uuid.uuid4().hex[:6]}"
    config = base / "uplimit.toml"
    write_config(config, {
        "models": tiny_models(pair),
        "coding": {"frame_tokens": 4, "max_streams": 8, "max_context": 256},
        "link": {"downlink_port": free_port(), "uplink_port": free_port(), "tick_s": 0.02,
                 "lifetime_budget_bytes": BUDGET, "ledger": base / "ledger" / "ledger.db",
                 "receive_counter": base / "received.db",
                 "secret_file": create_secret(base / "link.secret"), "max_latency_s": 0},
        "inner": {"max_batch": 4},
        "outer": {"port": free_port(), "metrics_port": free_port(), "model_name": "tiny",
                  "kernel_meter": name},
    })  # fmt: skip
    env = {**os.environ, "UPLIMIT_HOME": str(base / "home"), "OMP_NUM_THREADS": "1"}
    subprocess.run([UPLIMIT, "budget", "init", "--config", str(config)], env=env, check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    yield base, config, env
    subprocess.run(["ip", "netns", "del", f"uplimit-{name}"], capture_output=True, check=False)
    shutil.rmtree(base)


class Served:
    """`serve outer` and `serve inner` as processes, logging to files; stopped at the end."""

    def __init__(self, base: Path, config: Path, env: dict[str, str]) -> None:
        self.base, self.config, self.env = base, config, env
        self.procs: dict[str, subprocess.Popen] = {}
        text = config.read_text()
        self.url = "http://127.0.0.1:" + re.search(r"\[outer\][^[]*?\nport = (\d+)", text)[1]
        self.metrics = "http://127.0.0.1:" + re.search(r"metrics_port = (\d+)", text)[1]

    def start(self, side: str, *extra: str) -> None:
        log = (self.base / f"{side}.log").open("w")
        argv = [UPLIMIT, "serve", side, "--config", str(self.config), *extra]
        self.procs[side] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env)  # fmt: skip

    def log(self, side: str) -> str:
        return (self.base / f"{side}.log").read_text()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + SLOW
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            dead = {s: p.returncode for s, p in self.procs.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {s}\n{self.log(s)[-3000:]}" for s in self.procs)
                raise AssertionError(f"the link did not come up; exited {dead}\n{logs}")
            time.sleep(0.1)

    def metric(self, name: str) -> str:
        text = httpx.get(f"{self.metrics}/metrics", timeout=10).text
        return re.search(rf"^{name} (\S+)$", text, re.M)[1]

    def stop(self) -> dict[str, int]:
        codes = {}
        for side in ("outer", "both", "inner"):  # the outer's SHUTDOWN ends the inner
            proc = self.procs.pop(side, None)
            if proc is None:
                continue
            if side != "inner":
                proc.send_signal(signal.SIGTERM)
            try:
                codes[side] = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[side] = proc.wait()
        return codes


def _complete(url: str) -> dict:
    body = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 16, "temperature": 0.0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_serve_inner_as_root_is_confined(world):
    base, config, env = world
    name = re.search(r'kernel_meter = "(\w+)"', config.read_text())[1]
    served = Served(base, config, env)
    try:
        served.start("outer")
        served.start("inner")
        served.wait_healthy()
        assert served.metric("uplimit_inner_confined") == "1.0"
        _complete(served.url)

        # What runs in the namespace: the inner's user, no capabilities at all.
        pids = subprocess.run(["ip", "netns", "pids", f"uplimit-{name}"], capture_output=True,
                              text=True, check=True).stdout.split()  # fmt: skip
        assert pids
        nobody = pwd.getpwnam("nobody").pw_uid
        for pid in pids:
            status = _status(int(pid))
            assert status["Uid"].split() == [str(nobody)] * 4, status["Uid"]
            assert {int(status[c], 16) for c in ("CapEff", "CapPrm", "CapBnd")} == {0}

        # The served system's meters agree: ledger (through its file, as root), the outer's
        # receive counter, and the kernel quota of the inner's namespace.
        meters = subprocess.run([UPLIMIT, "meters", "--config", str(config), "--json"],
                                env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert meters.returncode == 0, meters.stdout + meters.stderr
        report = json.loads(meters.stdout)
        assert report["kernel"]["quota_bytes"] == kernel_quota_bytes(BUDGET)
        assert 0 < report["received_bytes"] <= report["ledger"]["wire_bytes"]
    finally:
        codes = served.stop()
    assert codes == {"outer": 0, "inner": 0}, served.log("inner")[-3000:]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"uplimit-{name}" not in listed  # the launcher removed it
    assert "ALARM" not in served.log("inner") + served.log("outer")


def test_without_confinement_it_refuses_or_alarms(world):
    base, config, env = world
    nobody = pwd.getpwnam("nobody")
    # Not root: no namespace, no quota. It refuses to start.
    as_user = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
               "--clear-groups", "--"]  # fmt: skip
    refused = subprocess.run([*as_user, UPLIMIT, "serve", "inner", "--config", str(config)],
                             env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2
    assert "cannot confine the inner side" in refused.stdout + refused.stderr
    # --unconfined: it serves, says ALARM at start, and the outer shows it.
    served = Served(base, config, env)
    try:
        served.start("outer")
        served.start("inner", "--unconfined")
        served.wait_healthy()
        assert served.metric("uplimit_inner_confined") == "0.0"
        assert UNCONFINED_ALARM in served.log("inner")
    finally:
        served.stop()


def test_serve_both_as_root_confines_its_inner_half(world):
    base, config, env = world
    name = re.search(r'kernel_meter = "(\w+)"', config.read_text())[1]
    served = Served(base, config, env)
    try:
        served.start("both")
        served.wait_healthy()
        assert served.metric("uplimit_inner_confined") == "1.0"
        _complete(served.url)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"uplimit-{name}" in listed
    finally:
        codes = served.stop()
    assert codes == {"both": 0}, served.log("both")[-3000:]
    assert "ALARM" not in served.log("both")


def test_code_the_inner_user_cannot_read_is_refused_before_the_child_starts(world):
    """A copy of the code in a 0700 directory (what `mktemp -d` makes): the launcher imports
    it, its user could not, so the launcher refuses with the reason."""
    base, config, env = world
    private = base / "private"
    private.mkdir(mode=0o700)
    shutil.copytree(Path(__import__("uplimit").__file__).parent, private / "uplimit")
    env = {**env, "PYTHONPATH": str(private)}
    refused = subprocess.run([UPLIMIT, "serve", "inner", "--config", str(config)], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    out = " ".join((refused.stdout + refused.stderr).split())  # unwrapped
    assert refused.returncode == 2, out
    assert "the inner's user cannot run" in out
    assert f"with {private.resolve()}/uplimit/__init__.py (it imports /" in out
    # The demos ask the same question first, and serve unconfined (saying why) instead.
    asked = subprocess.run(
        [sys.executable, "-c", "from uplimit.link.confine import confinable; print(confinable())"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "ok=False" in asked.stdout and "cannot run" in asked.stdout, asked.stdout
