"""`uplimit` commands as separate processes, for the tests that run them (logs in files)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.models.base import LanguageModel

__all__ = ["UPLIMIT", "Processes", "healthy", "metric", "strong_text"]

UPLIMIT = str(Path(sys.executable).with_name("uplimit"))


class Processes:
    """Started processes, each logging to a file; all stopped at the end, pass or fail."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.env = {**os.environ, "UPLIMIT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
        self.procs: dict[str, subprocess.Popen] = {}

    def init_ledger(self, config: Path, *options: str) -> None:
        """`uplimit budget init`: serving refuses a ledger that was never initialised."""
        subprocess.run([UPLIMIT, "budget", "init", "--config", str(config), *options],
                       env=self.env, check=True, capture_output=True, timeout=120)  # fmt: skip

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.dir / f"{name}.log").open("w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text()

    def wait_for(self, condition, what: str, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() not in (None, 0)}
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)
                raise AssertionError(f"waiting for {what}; exited: {dead}\n{logs}")
            time.sleep(0.1)

    def stop(self, name: str, timeout_s: float = 60.0) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name, 10)


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url, timeout=10).text
    found = re.search(rf"^{name}(?:\{{{labels}\}})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def strong_text(
    strong: LanguageModel, prompt: str, temperature: float, seed: int, max_tokens: int
) -> str:
    """The strong model's own answer to `prompt` (what a served request must return)."""
    ids = tuple(strong.tokenize(prompt))
    [gen], _ = generate(strong, [Request(ids, SamplingParams(temperature), seed, max_tokens)])
    return strong.detokenize([t for t in gen.tokens if t not in strong.info.eos_ids])
