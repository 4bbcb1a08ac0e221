"""`uplimit serve relay` as root confines itself (relay.confine): real processes on the tiny
pair, a real network namespace with its gated nftables quota, a real unprivileged user, the
relay's ledger charge-only over a unix socket; the inner runs unconfined beside it (its own
confinement is test_confined_inner.py's).

- The outer's user gets the strong model's own answer through the confined relay, and the
  outer hears the relay claim confinement at link 2's handshake.
- The kernel's count of link 2's TCP payload equals the relay ledger's wire bytes; the relay's
  own users' answers pass beside the quota (served), not through it.
- From inside the namespace, as the relay's user, nothing but link 2 can be reached.
- The quota set below what a request needs: the launcher closes link 2 and the outer's user
  gets a 503; the relay still serves its own users.
Without root it refuses to start unless --unconfined (test_relay_processes.py runs that way).
"""

from __future__ import annotations

import json
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.config import tiny_models, write_config
from support.net import free_port
from support.processes import UPLIMIT, Processes, healthy, metric, strong_text
from uplimit.link.auth import create_secret
from uplimit.link.confine import kernel_quota_bytes
from uplimit.link.kernel import KernelMeter, available

PROMPT = "def add(a, b):"
CODING = {"frame_tokens": 4, "max_streams": 8, "max_context": 256}
BUDGET = 1_000_000

# As the relay's user inside its namespace: connect to the veth's outer end on a port that
# is not link 2's (something listens there); print what happened.
_ESCAPE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("connected")
except OSError as e:
    print(type(e).__name__)
"""


class Deployment:
    """Three configs in a tree the relay's user can read; the ledgers in a directory of their
    own (the relay's user must not write it), the relay's files in another."""

    def __init__(self, base: Path, models: dict) -> None:
        self.base, self.meter = base, f"r{uuid.uuid4().hex[:6]}"
        (base / "ledgers").mkdir()
        (base / "relay").mkdir()
        inner_secret = create_secret(base / "inner.secret")
        relay_secret = create_secret(base / "relay.secret")
        self.relay_ledger = base / "ledgers" / "relay.db"
        self.outer_received = base / "outer-received.db"
        inner_link = {"downlink_port": free_port(), "uplink_port": free_port(),
                      "lifetime_budget_bytes": BUDGET, "secret_file": inner_secret}  # fmt: skip
        relay_link = {"downlink_port": free_port(), "uplink_port": free_port(),
                      "secret_file": relay_secret}  # fmt: skip
        self.relay_port, self.outer_port = free_port(), free_port()
        self.relay_metrics, self.outer_metrics = free_port(), free_port()
        self.paths = {name: base / f"{name}.toml" for name in ("inner", "relay", "outer")}
        write_config(self.paths["inner"], {
            "models": models, "coding": CODING,
            "link": {**inner_link, "tick_s": 0.02, "max_latency_s": 0,
                     "ledger": base / "ledgers" / "inner.db",
                     "downlink_log": base / "inner-downlink.jsonl"},
            "inner": {"max_batch": 4, "audit": base / "audit.db"},
        })  # fmt: skip
        write_config(self.paths["relay"], {
            "models": models, "coding": CODING,
            "link": {**inner_link, "receive_counter": base / "relay" / "received.db"},
            "outer": {"port": self.relay_port, "metrics_port": self.relay_metrics,
                      "model_name": "tiny", "rollout_record": base / "relay" / "rollout.json"},
            "relay": {**relay_link, "tick_s": 0.02, "ledger": self.relay_ledger,
                      "downlink_log": base / "relay" / "downlink.jsonl", "release": "tick",
                      "lifetime_budget_bytes": BUDGET, "kernel_meter": self.meter},
        })  # fmt: skip
        write_config(self.paths["outer"], {
            "models": models, "coding": CODING,
            "link": {**relay_link, "lifetime_budget_bytes": BUDGET,
                     "receive_counter": self.outer_received, "ledger": self.relay_ledger},
            "outer": {"port": self.outer_port, "metrics_port": self.outer_metrics,
                      "model_name": "tiny", "kernel_meter": self.meter},
        })  # fmt: skip

    def start(self, procs: Processes) -> None:
        procs.init_ledger(self.paths["inner"])
        procs.init_ledger(self.paths["relay"], "--relay")
        for name in ("outer", "relay"):
            procs.start(name, [UPLIMIT, "serve", name, "--config", str(self.paths[name])])
        inner = [UPLIMIT, "serve", "inner", "--unconfined", "--config", str(self.paths["inner"])]
        procs.start("inner", inner)
        procs.wait_for(lambda: healthy(self.url("relay")), "the inner's link to the relay")
        procs.wait_for(lambda: healthy(self.url("outer")), "the relay's link to the outer")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.relay_port if name == 'relay' else self.outer_port}"

    def ask(self, name: str, **body) -> httpx.Response:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, **body}
        return httpx.post(f"{self.url(name)}/v1/completions", json=body, timeout=120)

    def kernel(self):
        return KernelMeter(self.meter, 1).read()

    def meters(self, env: dict[str, str]) -> dict:
        """`uplimit meters --config outer.toml`: link 2's ledger, the outer's count, the
        relay's kernel meter ([outer] kernel_meter)."""
        out = subprocess.run([UPLIMIT, "meters", "--config", str(self.paths["outer"]), "--json"],
                             env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout)


@pytest.fixture
def deployment(missing, tiny_pair_dirs) -> Iterator[Deployment]:
    can = available()
    if not can.ok:
        missing("kernel", f"a confined relay needs the kernel meter: {can.reason}")
    base = Path(tempfile.mkdtemp(prefix="uplimit-relay-confined-"))
    base.chmod(0o755)
    for d in tiny_pair_dirs:  # pytest's own directories are root's only
        shutil.copytree(d, base / "pair" / d.name)
    subprocess.run(["chmod", "-R", "a+rX", str(base / "pair")], check=True)
    models = tiny_models(tuple(base / "pair" / d.name for d in tiny_pair_dirs))
    deployment = Deployment(base, models)
    yield deployment
    subprocess.run(["ip", "netns", "del", f"uplimit-{deployment.meter}"], capture_output=True)
    shutil.rmtree(base)


def test_a_confined_relay_meters_link_2_in_the_kernel_and_fails_closed_at_its_quota(
    deployment, tiny_strong
):
    d, procs = deployment, Processes(deployment.base)
    try:
        d.start(procs)
        outer_metrics = f"http://127.0.0.1:{d.outer_metrics}/metrics"
        assert metric(outer_metrics, "uplimit_inner_confined") == 1.0  # the relay's claim
        pids = subprocess.run(["ip", "netns", "pids", f"uplimit-{d.meter}"], capture_output=True,
                              text=True, check=True).stdout.split()  # fmt: skip
        nobody = pwd.getpwnam("nobody")
        for pid in pids:
            status = dict(
                line.split(":\t", 1)
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":\t" in line
            )
            assert status["Uid"].split() == [str(nobody.pw_uid)] * 4, status["Uid"]
            assert {int(status[c], 16) for c in ("CapEff", "CapPrm", "CapBnd")} == {0}

        # The relay's own user: answered beside the quota, which does not move.
        before = d.kernel()
        mine = d.ask("relay", temperature=0.7, seed=5)
        assert mine.status_code == 200, mine.text
        assert mine.json()["choices"][0]["text"] == strong_text(tiny_strong, PROMPT, 0.7, 5, 24)
        after = d.kernel()
        assert (
            after.sent_bytes == before.sent_bytes
            and after.quota_used_bytes == before.quota_used_bytes
        )
        assert after.served_bytes > before.served_bytes

        # The outer's user: exactly the strong model's answer, up link 2 through the quota,
        # whose TCP payload is the relay ledger's wire bytes to the byte.
        theirs = d.ask("outer", temperature=0.0)
        assert theirs.status_code == 200, theirs.text
        assert theirs.json()["choices"][0]["text"] == strong_text(tiny_strong, PROMPT, 0.0, 0, 24)
        report = d.meters(procs.env)
        assert report["agree"], report["checks"]
        kernel = report["kernel"]
        assert kernel["quota_bytes"] == kernel_quota_bytes(BUDGET)
        assert kernel["tcp_payload_bytes"] == report["ledger"]["wire_bytes"] > 0
        assert 0 < report["received_bytes"] <= report["ledger"]["wire_bytes"]
        assert kernel["refused_packets"] == kernel["dropped_packets"] == 0
        print(
            f"\nlink 2: kernel TCP payload {kernel['tcp_payload_bytes']:,} B, relay ledger wire"
            f" {report['ledger']['wire_bytes']:,} B, outer read {report['received_bytes']:,} B;"
            f" through the quota {kernel['sent_bytes']:,} IP B in {kernel['sent_packets']}"
            f" packets; served beside it {kernel['served_bytes']:,} B (the relay user's answer:"
            f" {after.served_bytes - before.served_bytes:,} B)"
        )

        # As the relay's user, from inside: anything but link 2 is out of reach.
        km = KernelMeter(d.meter, 1)
        with socket.create_server(("0.0.0.0", 0)) as elsewhere:
            elsewhere.settimeout(0.1)
            argv = [
                sys.executable,
                "-c",
                _ESCAPE,
                km.outer_address,
                str(elsewhere.getsockname()[1]),
            ]
            tried = subprocess.run(km.command(argv, user=(nobody.pw_uid, nobody.pw_gid)),
                                   capture_output=True, text=True, timeout=30)  # fmt: skip
            assert tried.stdout.strip() == "TimeoutError", tried.stdout + tried.stderr
            with pytest.raises(TimeoutError):
                elsewhere.accept()
        assert d.kernel().refused_packets > 0

        # The quota set (by root, at run time) to 200 bytes above what has passed: the next
        # long answer cannot go up; the launcher closes link 2 and the outer answers 503.
        used = d.kernel().quota_used_bytes
        quota = ["nft", "add", "quota", "inet", "uplimit", "up", f"{{ over {used + 200} bytes }}"]
        subprocess.run(km.command(quota, privileged=True), check=True, timeout=30)
        assert d.kernel().quota_bytes == used + 200
        cut = d.ask("outer", temperature=1.0, seed=3, max_tokens=200)
        assert cut.status_code == 503, cut.text
        assert cut.json()["error"]["code"] == "inner_unreachable"
        cut_reading = d.kernel()
        assert cut_reading.dropped_packets > 0
        print(f"quota cut: {cut_reading.sent_bytes:,} IP B passed, {cut_reading.dropped_bytes:,} B"
              f" in {cut_reading.dropped_packets} packets dropped")  # fmt: skip
        assert "ALARM quota-exhausted" in procs.log("relay")
        assert d.ask("relay", temperature=0.0).status_code == 200  # its own users still
    finally:
        codes = {name: procs.stop(name) for name in ("outer", "relay")}
        procs.stop_all()
    assert codes["relay"] == 0, procs.log("relay")[-3000:]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"uplimit-{d.meter}" not in listed  # the launcher removed it


def test_without_root_the_relay_refuses_to_start_unconfined(deployment):
    nobody = pwd.getpwnam("nobody")
    as_user = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
               "--clear-groups", "--"]  # fmt: skip
    argv = [*as_user, UPLIMIT, "serve", "relay", "--config", str(deployment.paths["relay"])]
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "cannot confine the relay" in refused.stdout + refused.stderr
