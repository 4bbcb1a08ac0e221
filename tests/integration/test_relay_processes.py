"""The relay tier (docs/tiers.md) as three processes on the tiny pair: `serve inner`,
`serve relay`, `serve outer`, each with its own config, ledger or receive counter.

- A relay user's answer and an outer user's answer are both the strong model's own text.
- Each link's ledger is charged for its own bytes only: the relay's user makes the inner's
  ledger grow, not the relay's; the outer's user makes both grow; each link's receive count
  agrees with its ledger (`uplimit meters`).
- The relay or the inner killed (-9), or the relay restarted, while an outer user's stream is
  in flight: that request and the next get OpenAI-shaped errors at the outer (fail closed; the
  relay ends the outer's link with END(error) when the inner's link fails; a link serves one
  peer, so the outer stays closed after a relay restart until it is restarted too).
- The relay's budget exhausted: END up to the outer, whose users get the budget's 503.
- A weak-model rollout from the outer reaches the relay, then the inner (`uplimit rollout`
  with both URLs); a file corrupted on its way is refused at the relay, which ends link 2.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from support.config import tiny_models, write_config
from support.marks import slow
from support.net import free_port
from support.processes import UPLIMIT, Processes, healthy, metric, strong_text
from uplimit.coding.calibration import Calibration
from uplimit.link.agreement import as_json, checks, read_meters
from uplimit.link.auth import create_secret
from uplimit.models import store
from uplimit.models.active import ActiveWeak
from uplimit.models.llama import LlamaModel
from uplimit.models.tiny import export_gguf
from uplimit.relay.confine import UNCONFINED_ALARM
from uplimit.wire.fingerprint import codec_fingerprint, fingerprint_sha256
from uplimit.wire.frame import FrameConfig
from uplimit.wire.request import choice_seed

PROMPT = "def add(a, b):"
CODING = {"frame_tokens": 4, "max_streams": 8, "max_context": 256}
ADMIN = "admin-secret"
WIDE = {"COLUMNS": "300"}  # a command's console: one line a row


class Tiers:
    """The three configs of one deployment on loopback (files under `tmp_path`)."""

    def __init__(
        self,
        tmp_path: Path,
        models: dict,
        relay: dict,
        inner_tick_s: float = 0.02,
        downlink_bytes_per_s: int = 1 << 20,
    ) -> None:
        inner_secret, relay_secret = tmp_path / "inner.secret", tmp_path / "relay.secret"
        create_secret(inner_secret)
        create_secret(relay_secret)
        self.inner_ledger, self.relay_ledger = tmp_path / "inner.db", tmp_path / "relay.db"
        self.relay_received = tmp_path / "relay-received.db"
        self.outer_received = tmp_path / "outer-received.db"
        rate = {"downlink_bytes_per_s": downlink_bytes_per_s}  # what a rollout is paced at
        inner_link = {"downlink_port": free_port(), "uplink_port": free_port(), **rate,
                      "lifetime_budget_bytes": 1_000_000, "secret_file": inner_secret}  # fmt: skip
        relay_link = {"downlink_port": free_port(), "uplink_port": free_port(),
                      "secret_file": relay_secret}  # fmt: skip
        self.relay_port, self.outer_port = free_port(), free_port()
        self.relay_metrics, self.outer_metrics = free_port(), free_port()
        self.inner = write_config(tmp_path / "inner.toml", {
            "models": models, "coding": CODING,
            "link": {**inner_link, "tick_s": inner_tick_s, "max_latency_s": 0,
                     "ledger": self.inner_ledger,
                     "downlink_log": tmp_path / "inner-downlink.jsonl"},
            "inner": {"max_batch": 4, "audit": tmp_path / "audit.db"},
        })  # fmt: skip
        self.relay = write_config(tmp_path / "relay.toml", {
            "models": models, "coding": CODING,
            "link": {**inner_link, "receive_counter": self.relay_received,
                     "ledger": self.inner_ledger},
            "outer": {"port": self.relay_port, "metrics_port": self.relay_metrics,
                      "model_name": "tiny", "admin_key": ADMIN,
                      "rollout_record": tmp_path / "relay-link1.json"},
            "relay": {**relay_link, "tick_s": 0.02, "ledger": self.relay_ledger,
                      "downlink_log": tmp_path / "relay-downlink.jsonl", **relay},
        })  # fmt: skip
        budget = self.relay.relay.lifetime_budget_bytes or 1_000_000
        self.outer = write_config(tmp_path / "outer.toml", {
            "models": models, "coding": CODING,
            "link": {**relay_link, **rate, "lifetime_budget_bytes": budget,
                     "receive_counter": self.outer_received, "ledger": self.relay_ledger},
            "outer": {"port": self.outer_port, "metrics_port": self.outer_metrics,
                      "model_name": "tiny", "admin_key": ADMIN},
        })  # fmt: skip
        self.paths = {name: tmp_path / f"{name}.toml" for name in ("inner", "relay", "outer")}

    @property
    def relay_url(self) -> str:
        return f"http://127.0.0.1:{self.relay_port}"

    @property
    def outer_url(self) -> str:
        return f"http://127.0.0.1:{self.outer_port}"

    def start(self, procs: Processes) -> None:
        procs.init_ledger(self.paths["inner"])
        procs.init_ledger(self.paths["relay"], "--relay")
        self.launch(procs)

    @property
    def relay_argv(self) -> list[str]:
        return [UPLIMIT, "serve", "relay", "--unconfined", "--config", str(self.paths["relay"])]

    def launch(self, procs: Processes) -> None:
        """Start the three processes (their ledgers exist) and wait for both links."""
        procs.start("outer", [UPLIMIT, "serve", "outer", "--config", str(self.paths["outer"])])
        # Unconfined: the tiny pair lies where only root can read it (test_confined_inner.py;
        # test_relay_confined.py confines the relay)
        procs.start("relay", self.relay_argv)
        inner = [UPLIMIT, "serve", "inner", "--unconfined", "--config", str(self.paths["inner"])]
        procs.start("inner", inner)
        procs.wait_for(lambda: healthy(self.relay_url), "the inner's link to the relay")
        procs.wait_for(lambda: healthy(self.outer_url), "the relay's link to the outer")

    def meters(self) -> tuple[dict, dict]:
        """Both links' meters as `uplimit meters --json` shows them: inner -> relay, relay ->
        outer (read here; `test_relay_and_outer_users...` runs the command once)."""
        inner = read_meters(ledger=str(self.inner_ledger), received=self.relay_received)
        relay = read_meters(ledger=str(self.relay_ledger), received=self.outer_received)
        return as_json(inner, checks(inner)), as_json(relay, checks(relay))


def _ask(url: str, timeout_s: float = 120, **body) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, **body}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout_s)


def test_relay_and_outer_users_get_the_strong_text_and_each_ledger_its_own_bytes(
    tiny_pair_dirs, tiny_strong, tmp_path
):
    tiers = Tiers(tmp_path, tiny_models(tiny_pair_dirs), {"release": "stream"})
    procs = Processes(tmp_path)
    try:
        tiers.start(procs)
        inner_before, relay_before = tiers.meters()

        # The relay's own user: the inner uploads to the relay, the relay nothing to the outer.
        r = _ask(tiers.relay_url, temperature=0.7, seed=5)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == strong_text(tiny_strong, PROMPT, 0.7, 5, 24)
        inner_mid, relay_mid = tiers.meters()
        assert inner_mid["ledger"]["wire_bytes"] > inner_before["ledger"]["wire_bytes"]
        assert relay_mid["ledger"] == relay_before["ledger"]
        assert relay_mid["received_bytes"] == relay_before["received_bytes"]

        # The outer's users (T=0 and T>0, n=2): through the relay, re-coded there.
        r0 = _ask(tiers.outer_url, temperature=0.0)
        r1 = _ask(tiers.outer_url, temperature=0.7, seed=9, n=2)
        assert r0.status_code == 200 and r1.status_code == 200, (r0.text, r1.text)
        assert r0.json()["choices"][0]["text"] == strong_text(tiny_strong, PROMPT, 0.0, 0, 24)
        texts = [c["text"] for c in sorted(r1.json()["choices"], key=lambda c: c["index"])]
        assert texts == [
            strong_text(tiny_strong, PROMPT, 0.7, choice_seed(9, i), 24) for i in (0, 1)
        ]
        inner_after, relay_after = tiers.meters()
        assert inner_after["ledger"]["wire_bytes"] > inner_mid["ledger"]["wire_bytes"]
        assert relay_after["ledger"]["wire_bytes"] > relay_mid["ledger"]["wire_bytes"]
        # Each link's meters agree: what its receiver read, its ledger charged first.
        assert inner_after["agree"] and relay_after["agree"], (inner_after, relay_after)
        assert 0 < relay_after["received_bytes"] <= relay_after["ledger"]["wire_bytes"]
        outer_metrics = f"http://127.0.0.1:{tiers.outer_metrics}/metrics"
        assert metric(outer_metrics, "uplimit_tokens_total")
        assert metric(outer_metrics, "uplimit_inner_confined") == 0.0  # the relay said so
        assert UNCONFINED_ALARM in procs.log("relay")  # and no other alarm anywhere
        assert "ALARM" not in procs.log("relay").replace(UNCONFINED_ALARM, "") + procs.log("outer")
        # `uplimit meters` across both links: the relay's config, then the outer's.
        configs = ["--config", str(tiers.paths["relay"]), "--config", str(tiers.paths["outer"])]
        out = subprocess.run([UPLIMIT, "meters", *configs, "--json"], env=procs.env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout) == [
            {"config": str(tiers.paths[name]), **link}
            for name, link in zip(("relay", "outer"), tiers.meters(), strict=True)
        ]
    finally:
        procs.stop_all()


@pytest.mark.parametrize(
    "killed",
    [
        "relay",
        pytest.param("inner", marks=slow("an ended link 1, as relay restarted, 13 s")),
        "relay restarted",
    ],
)
def test_a_tier_killed_mid_stream_fails_closed_at_the_outer(tiny_pair_dirs, tmp_path, killed):
    # Frames of 4 tokens every 0.1 s: the answer below takes ~5 s to come up to the relay.
    tiers = Tiers(tmp_path, tiny_models(tiny_pair_dirs), {"release": "tick"}, inner_tick_s=0.1)
    procs = Processes(tmp_path)
    answers: list[httpx.Response] = []
    try:
        tiers.start(procs)
        asking = threading.Thread(
            target=lambda: answers.append(
                _ask(tiers.outer_url, temperature=1.0, seed=3, max_tokens=200)
            )
        )
        asking.start()
        relay_metrics = f"http://127.0.0.1:{tiers.relay_metrics}/metrics"
        procs.wait_for(lambda: metric(relay_metrics, "uplimit_tokens_total") > 0, "tokens")
        if killed == "relay restarted":  # SIGTERM: its server stops, link 2 closes, then again
            assert procs.stop("relay") == 0
            procs.start("relay", tiers.relay_argv)
        else:
            procs.procs[killed].kill()  # SIGKILL: no END, no SHUTDOWN, sockets reset
        asking.join(60)
        assert answers, "the outer's request did not end"
        [cut] = answers
        assert cut.status_code == 503, cut.text
        assert cut.json()["error"]["code"] == "inner_unreachable"
        after = _ask(tiers.outer_url, temperature=0.0)
        assert after.status_code == 503
        assert set(after.json()["error"]) >= {"message", "type", "code"}
        assert not healthy(tiers.outer_url)
        if killed == "inner":  # the relay sent END(error) up and stopped with the error
            assert procs.procs["relay"].wait(60) != 0
            assert "inner-error" in procs.log("outer")
        if killed == "relay restarted":  # it said END(shutdown) as it stopped: no alarm
            assert "ALARM" not in procs.log("outer"), procs.log("outer")
    finally:
        procs.stop_all()


def test_relay_budget_exhausted_ends_the_outer_link_and_the_relay_still_serves_its_users(
    tiny_pair_dirs, tmp_path
):
    tiers = Tiers(
        tmp_path, tiny_models(tiny_pair_dirs), {"release": "tick", "lifetime_budget_bytes": 600}
    )
    procs = Processes(tmp_path)
    try:
        tiers.start(procs)
        for seed in range(8):  # ~100 bytes an answer: the budget ends within a few
            r = _ask(tiers.outer_url, temperature=1.0, seed=seed, max_tokens=200)
            if r.status_code != 200:
                break
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "upload_budget_exhausted"
        procs.wait_for(lambda: "budget ended the link" in procs.log("relay"), "the relay's log")
        _, relay = tiers.meters()
        assert relay["ledger"]["lifetime_bytes"] <= 600 and relay["agree"], relay
        # Its own users do not need the outer's link.
        mine = _ask(tiers.relay_url, temperature=0.0)
        assert mine.status_code == 200, mine.text
        assert _ask(tiers.outer_url, temperature=0.0).status_code == 503
    finally:
        procs.stop_all()


@slow("a second outer on the same relay, 20 s")
def test_an_outer_restart_finds_the_relay_again(tiny_pair_dirs, tiny_strong, tmp_path):
    # release "tick": the outer's text streams as the relay decodes it, and is still exact.
    tiers = Tiers(tmp_path, tiny_models(tiny_pair_dirs), {"release": "tick"})
    procs = Processes(tmp_path)
    try:
        tiers.start(procs)
        assert _ask(tiers.outer_url, temperature=0.0).status_code == 200
        assert procs.stop("outer") == 0  # SIGTERM: SHUTDOWN up the relay's link, not further
        assert _ask(tiers.relay_url, temperature=0.0).status_code == 200  # its users still
        procs.start("outer2", [UPLIMIT, "serve", "outer", "--config", str(tiers.paths["outer"])])
        procs.wait_for(lambda: healthy(tiers.outer_url), "the relay's link to the new outer")
        r = _ask(tiers.outer_url, temperature=0.7, seed=2)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == strong_text(tiny_strong, PROMPT, 0.7, 2, 24)
        _, relay_link = tiers.meters()
        assert relay_link["agree"], relay_link
    finally:
        procs.stop_all()


@slow("the real pair in three processes, 14 s")
def test_the_real_pair_through_the_relay(real_strong, tmp_path):
    """Once on the real pair: both users' answers are the strong model's own text."""
    models = {"strong": str(store.status(store.STRONG).path),
              "weak": str(store.status(store.WEAK).path), "threads": 1}  # fmt: skip
    tiers = Tiers(tmp_path, models, {"release": "stream"})
    procs = Processes(tmp_path)
    try:
        tiers.start(procs)
        mine = _ask(tiers.relay_url, temperature=0.0, max_tokens=16, timeout_s=600)
        theirs = _ask(tiers.outer_url, temperature=0.7, seed=4, max_tokens=16, timeout_s=600)
        assert mine.status_code == 200 and theirs.status_code == 200, (mine.text, theirs.text)
        assert mine.json()["choices"][0]["text"] == strong_text(real_strong, PROMPT, 0.0, 0, 16)
        assert theirs.json()["choices"][0]["text"] == strong_text(real_strong, PROMPT, 0.7, 4, 16)
        inner_link, relay_link = tiers.meters()
        assert inner_link["agree"] and relay_link["agree"], (inner_link, relay_link)
    finally:
        procs.stop_all()


def _admin_status(url: str) -> dict:
    headers = {"authorization": f"Bearer {ADMIN}"}
    return httpx.get(f"{url}/admin/rollout", headers=headers, timeout=10).json()


class Rollouts:
    """The tiny pair in GGUF (rollouts send files) and a new weak model to roll out: a copy
    of the strong model's file, which shares the tokenizer and makes every guess hit."""

    def __init__(self, tiny_pair_dirs, tmp_path: Path) -> None:
        self.strong, self.weak = (export_gguf(d) for d in tiny_pair_dirs)
        self.new = tmp_path / "new-weak.gguf"
        shutil.copyfile(self.strong, self.new)
        self.sha = hashlib.sha256(self.new.read_bytes()).hexdigest()
        self.calibration = tmp_path / "calibration.json"
        self.calibration.write_text(Calibration().to_json())
        self.models = {"strong": str(self.strong), "weak": str(self.weak), "threads": 1}

    def command(self, weak: Path, *urls: str) -> list[str]:
        """`uplimit rollout` of `weak` through `urls`, top first."""
        tiers = [option for url in urls for option in ("--url", url)]
        return [UPLIMIT, "rollout", "--weak", str(weak), "--calibration", str(self.calibration),
                *tiers, "--admin-key", ADMIN]  # fmt: skip

    def run(self, procs: Processes, weak: Path, *urls: str) -> str:
        """Roll `weak` out through `urls` and return what the command said."""
        out = subprocess.run(self.command(weak, *urls), env=procs.env | WIDE,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stderr


def test_a_rollout_reaches_the_relay_then_the_inner_and_a_corrupted_file_is_refused(
    tiny_pair_dirs, tmp_path
):
    """`uplimit rollout --url <outer> --url <relay>` (docs/tiers.md, Rollouts): link 2
    switches, then the relay passes the file on down link 1; a stream open across both
    switches finishes exactly; then a file corrupted on its way ends link 2 at the relay."""
    files = Rollouts(tiny_pair_dirs, tmp_path)
    new, sha, weak_path = files.new, files.sha, files.weak
    # Frames of 4 tokens every 0.2 s: the long answer takes ~11 s to reach the relay; a
    # rollout's 676 kB take ~1.5 s a link at 3/4 of 400 kB/s.
    tiers = Tiers(tmp_path, files.models, {"release": "stream"}, 0.2, downlink_bytes_per_s=400_000)
    procs = Processes(tmp_path)
    home = tmp_path / "home"  # UPLIMIT_HOME: the records' and received files' default place
    strong = LlamaModel(files.strong, n_threads=1)
    long: list[tuple[httpx.Response, float]] = []
    try:
        tiers.start(procs)
        asking = threading.Thread(target=lambda: long.append(
            (_ask(tiers.outer_url, temperature=1.0, seed=3, max_tokens=220), time.time())
        ))  # fmt: skip
        asking.start()
        relay_metrics = f"http://127.0.0.1:{tiers.relay_metrics}/metrics"
        procs.wait_for(lambda: metric(relay_metrics, "uplimit_tokens_total") > 0, "tokens")

        said = files.run(procs, new, tiers.outer_url, tiers.relay_url)
        relay_status = _admin_status(tiers.relay_url)
        asking.join(60)

        # Both tiers switched (the relay's status is its link 1's: it passed the file on).
        for url in (tiers.outer_url, tiers.relay_url):
            assert f"{url}: switched" in said, said
        assert relay_status["state"] == "switched" and relay_status["sha256"] == sha
        # The stream open across both switches finished after them, exactly.
        [(r, ended)] = long
        assert r.status_code == 200, r.text
        assert ended > relay_status["switched"]
        assert r.json()["choices"][0]["text"] == strong_text(strong, PROMPT, 1.0, 3, 220)
        # New answers, at the outer and at the relay, are the strong model's own.
        theirs = _ask(tiers.outer_url, temperature=0.7, seed=9)
        assert theirs.json()["choices"][0]["text"] == strong_text(strong, PROMPT, 0.7, 9, 24)
        mine = _ask(tiers.relay_url, temperature=0.0)
        assert mine.json()["choices"][0]["text"] == strong_text(strong, PROMPT, 0.0, 0, 24)
        # Each link carried one offer and one SWITCH to the new model's fingerprint, and each
        # receiver decoded every frame at the first try: old streams with the old model, new
        # ones with the new, as their senders coded them.
        digest = fingerprint_sha256(
            codec_fingerprint(strong.info, Calibration(), FrameConfig(4, strong.info.n_vocab))
        )  # the new weak model is a copy of the strong one's file: the same hash
        for log in (tmp_path / "relay-downlink.jsonl", tmp_path / "inner-downlink.jsonl"):
            entries = [json.loads(line) for line in log.read_text().splitlines()]
            kinds = [e["type"] for e in entries]
            assert kinds.count("model_offer") == kinds.count("switch") == 1, log
            [switch] = [e for e in entries if e["type"] == "switch"]
            assert switch["fingerprint_sha256"] == digest.hex()
        for url in (f"http://127.0.0.1:{p}/metrics" for p in (tiers.relay_metrics,
                                                               tiers.outer_metrics)):  # fmt: skip
            assert metric(url, "uplimit_frames_total", 'outcome="rejected"') == 0
            assert metric(url, "uplimit_frames_total", 'outcome="decoded"') > 0
        # Each tier recorded the new model; the relay and the inner keep the file they were sent.
        records = [home / "rollout-outer.json", home / "rollout-relay.json",
                   tmp_path / "relay-link1.json", home / "rollout-inner.json"]  # fmt: skip
        assert [ActiveWeak.load(path).sha256 for path in records] == [sha] * 4
        for received in (home / "relay-received", home / "received"):
            assert (received / f"weak-{sha[:16]}.gguf").read_bytes() == new.read_bytes()
        listed = subprocess.run(
            [UPLIMIT, "models", "list", "--config", str(tiers.paths["relay"])],
            env=procs.env | WIDE, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        rows = {r.split("│")[1].strip(): r for r in listed.stdout.splitlines() if "│" in r}
        assert sha[:16] in rows["outer"] and sha[:16] in rows["relay"], listed.stdout  # links 1, 2

        # A file that changes after the outer checked it: the relay refuses it, link 2 ends
        # with END(error), the outer's users get OpenAI-shaped errors, its own users do not.
        corrupt = tmp_path / "corrupt.gguf"
        shutil.copyfile(weak_path, corrupt)
        command = files.command(corrupt, tiers.outer_url, tiers.relay_url)
        rolling = subprocess.Popen(command, env=procs.env | WIDE, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)  # fmt: skip
        procs.wait_for(lambda: _admin_status(tiers.outer_url)["state"] == "sending", "sending")
        with corrupt.open("r+b") as f:  # its last chunk is read ~0.9 s after the first
            f.seek(-1, 2)
            last = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([last[0] ^ 1]))
        said, _ = rolling.communicate(timeout=120)
        assert rolling.returncode != 0 and f"rollout failed at {tiers.relay_url}" in said, said
        refused = _admin_status(tiers.relay_url)
        assert refused["state"] == "failed" and "arrived with sha256" in refused["error"]
        cut = _ask(tiers.outer_url, temperature=0.0)
        assert cut.status_code == 503 and cut.json()["error"]["code"] == "inner_unreachable"
        mine = _ask(tiers.relay_url, temperature=0.7, seed=5)
        assert mine.json()["choices"][0]["text"] == strong_text(strong, PROMPT, 0.7, 5, 24)
        assert [ActiveWeak.load(path).sha256 for path in records[1:]] == [sha] * 3
        assert sorted(p.name for p in (home / "relay-received").iterdir()) == sorted(
            [f"weak-{sha[:16]}.gguf", f"weak-{sha[:16]}.calibration.json"]
        )

        # The relay's own rollout of link 1 (its /admin/rollout), here back to the first model.
        said = files.run(procs, weak_path, tiers.relay_url)
        assert f"{tiers.relay_url}: switched" in said, said
        first = hashlib.sha256(weak_path.read_bytes()).hexdigest()
        assert [ActiveWeak.load(path).sha256 for path in records[1:]] == [sha, first, first]
        mine = _ask(tiers.relay_url, temperature=0.7, seed=6)
        assert mine.json()["choices"][0]["text"] == strong_text(strong, PROMPT, 0.7, 6, 24)
    finally:
        procs.stop_all()
        strong.close()


@slow("a rollout through three tiers, then the three restarted: 22 s")
def test_a_deployment_restarted_after_a_rollout_serves_the_recorded_models(
    tiny_pair_dirs, tmp_path
):
    """Each tier codes each of its links with the model its record names: restarted, both
    links' handshakes pass, and the answers are still the strong model's."""
    files = Rollouts(tiny_pair_dirs, tmp_path)
    tiers = Tiers(tmp_path, files.models, {"release": "stream"})
    procs = Processes(tmp_path)
    strong = LlamaModel(files.strong, n_threads=1)
    try:
        tiers.start(procs)
        files.run(procs, files.new, tiers.outer_url, tiers.relay_url)
        for name in ("relay", "outer", "inner"):  # the relay's SHUTDOWN stops the inner
            procs.stop(name)
        tiers.launch(procs)
        theirs = _ask(tiers.outer_url, temperature=0.7, seed=9)
        assert theirs.json()["choices"][0]["text"] == strong_text(strong, PROMPT, 0.7, 9, 24)
        mine = _ask(tiers.relay_url, temperature=0.0)
        assert mine.json()["choices"][0]["text"] == strong_text(strong, PROMPT, 0.0, 0, 24)
        said = procs.log("relay")
        for side in ("outer", "relay"):  # link 1's record, link 2's
            assert f"{side}: serving the weak model a rollout switched to" in said, said
    finally:
        procs.stop_all()
        strong.close()
