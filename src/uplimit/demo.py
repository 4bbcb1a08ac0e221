"""The services demo: inner and outer as separate processes, a client talking OpenAI to them.

    this process (client)  --HTTP-->  outer process  <--link (2 x TCP)-->  inner process
                                     (weak model)                          (strong + weak)

As root with nftables, the inner runs in its own network namespace behind the kernel quota
(`link.kernel`), reaching only the outer's end of a veth pair; otherwise all on loopback.
Everything lives in a fresh directory (config, ledger, audit store, logs), so the budget used
is this run's. The client sends a fixed set of prompts at T = 0 and T = 0.7, streaming, and
shows each answer with its tokens, uplink bits and what gzip would need for the same text;
then a summary against the strong weights. On exit (also on Ctrl-C or a failure) the outer
is sent SIGTERM, which shuts the link down (SHUTDOWN), the inner stops, and anything left is
killed by pid; the namespace is removed by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from uplimit.errors import BackendError
from uplimit.link.auth import create_secret
from uplimit.link.budget import Budgets
from uplimit.link.kernel import KernelMeter, KernelReading, available
from uplimit.link.ledger import LedgerState, open_ledger
from uplimit.models import store

__all__ = ["DEMO_PROMPTS", "run_service_demo"]

# Written for the demo; not taken from any benchmark or training set.
DEMO_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "What does the HTTP status code 503 mean?",
    "Give a one-line shell command that counts the lines of all .py files in a directory.",
)
TEMPERATURES = (0.0, 0.7)
MODEL_NAME = "uplimit-demo"
START_TIMEOUT_S = 600.0  # loading both models on a busy 2-core machine takes ~10-60 s
STOP_TIMEOUT_S = 30.0


@dataclass
class Answer:
    prompt: str
    temperature: float
    text: str = ""
    tokens: int = 0
    bits: float = 0.0  # all-in: the answer's share of its frames
    payload_bits: float = 0.0  # the tokens' own code
    finish: str = ""

    @property
    def gzip_bits(self) -> int:
        return 8 * len(gzip.compress(self.text.encode(), 9))


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _config(workdir: Path, link_host: str, inner_address: str, budget: int) -> tuple[Path, int]:
    """The demo's config file (and the link's secret, 0600, beside it), and the outer's HTTP
    port."""
    path, port = workdir / "uplimit.toml", _free_port()
    secret = create_secret(workdir / "link.secret")
    path.write_text(
        f"""[models]
threads = 1  # three model contexts share the cores: more threads only spin
[coding]
max_streams = 8
max_context = 1024
[link]
host = "{link_host}"
downlink_port = {_free_port()}
uplink_port = {_free_port()}
ledger = "{workdir / "ledger.db"}"
lifetime_budget_bytes = {budget}
downlink_log = "{workdir / "downlink.jsonl"}"
receive_counter = "{workdir / "received.db"}"
secret_file = "{secret}"
inner_addresses = "{inner_address}"
[inner]
frame_delay_s = 1.0
max_batch = {len(DEMO_PROMPTS)}
audit = "{workdir / "audit.db"}"
[outer]
port = {port}
model_name = "{MODEL_NAME}"
metrics_port = {_free_port()}
"""
    )
    return path, port


def _uplimit(*args: str) -> list[str]:
    return [sys.executable, "-c", "from uplimit.cli import main; main()", *args]


@contextlib.contextmanager
def _processes(
    workdir: Path, config: Path, meter: KernelMeter | None
) -> Iterator[tuple[subprocess.Popen, subprocess.Popen]]:
    """Start outer then inner; on exit stop them in that order and leave nothing behind."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = [open(workdir / f"{side}.log", "w") for side in ("outer", "inner")]  # noqa: SIM115
    procs: list[subprocess.Popen] = []
    try:
        for side, log in zip(("outer", "inner"), logs, strict=True):
            spawn = meter.popen if meter and side == "inner" else subprocess.Popen
            argv = _uplimit("serve", side, "--config", str(config))
            options = {"stdout": log, "stderr": subprocess.STDOUT, "env": env}
            procs.append(spawn(argv, start_new_session=True, **options))
        yield procs[0], procs[1]
    finally:
        # SIGTERM to the outer: uvicorn exits, the outer sends SHUTDOWN, the inner ends.
        for i, proc in enumerate(procs):
            if i == 1:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_TIMEOUT_S)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for log in logs:
            log.close()


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def _wait_serving(
    url: str, procs: dict[str, subprocess.Popen], workdir: Path, console: Console
) -> float:
    t0 = time.monotonic()
    with console.status("") as status:
        async with httpx.AsyncClient() as http:
            while True:
                elapsed = time.monotonic() - t0
                status.update(
                    f"loading models: inner (strong + weak), outer (weak) ... {elapsed:.0f} s"
                )
                for side, proc in procs.items():
                    if proc.poll() is not None:
                        raise BackendError(
                            f"the {side} side exited ({proc.returncode}):\n"
                            + _tail(workdir / f"{side}.log")
                        )
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{url}/health")).status_code == 200:
                        return elapsed
                if elapsed > START_TIMEOUT_S:
                    raise BackendError(f"the link did not come up in {START_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.25)


async def _ask(
    client: openai.AsyncOpenAI,
    answer: Answer,
    max_tokens: int,
    seed: int,
    progress: Progress,
    task: int,
) -> None:
    stream = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": answer.prompt}],
        temperature=answer.temperature,
        max_tokens=max_tokens,
        seed=seed,
        stream=True,
    )
    async for chunk in stream:
        for choice in chunk.choices:
            answer.text += choice.delta.content or ""
            if choice.finish_reason:
                extra = (chunk.model_extra or {}).get("uplimit", {})
                answer.finish = choice.finish_reason
                answer.tokens = extra.get("tokens", 0)
                answer.bits = extra.get("uploaded_bits", 0.0)
                answer.payload_bits = extra.get("payload_bits", 0.0)
        progress.update(task, completed=len(answer.text))


async def _client(url: str, max_tokens: int, console: Console) -> tuple[list[Answer], float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=0)
    answers, seconds = [], 0.0
    try:
        for temperature in TEMPERATURES:
            batch = [Answer(p, temperature) for p in DEMO_PROMPTS]
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
            with Progress(*columns, console=console, transient=True) as progress:
                tasks = [
                    progress.add_task(f"T={temperature} {a.prompt[:40]}... (chars)", total=None)
                    for a in batch
                ]
                t0 = time.monotonic()
                await asyncio.gather(
                    *(
                        _ask(client, a, max_tokens, i, progress, t)
                        for i, (a, t) in enumerate(zip(batch, tasks, strict=True))
                    )
                )
                seconds += time.monotonic() - t0
            for a in batch:
                console.print(_panel(a))
            answers += batch
    finally:
        await client.close()
    return answers, seconds


def _panel(a: Answer) -> Panel:
    n = max(a.tokens, 1)
    body = (
        f"[bold]{a.prompt}[/bold]\n\n{a.text}\n\n"
        f"[cyan]{a.tokens} tokens, {a.bits:.0f} bits uploaded ({a.bits / n:.3f} bits/token; "
        f"the tokens' own code {a.payload_bits / n:.3f}, the rest its share of the frames); "
        f"gzip would need {a.gzip_bits} bits ({a.gzip_bits / n:.1f} bits/token)[/cyan]"
    )
    return Panel(body, title=f"T = {a.temperature}  ({a.finish})", expand=False)


def run_service_demo(console: Console, *, max_tokens: int = 96) -> None:
    """The whole demo (module doc); raises BackendError if a side fails to start."""
    strong = store.status(store.STRONG)
    if not strong.verified:
        raise BackendError("the model pair is not fetched: run `uplimit models fetch`")
    weights = strong.path.stat().st_size
    budget = Budgets.default_for(weights).lifetime_bytes
    workdir = Path(tempfile.mkdtemp(prefix="uplimit-demo-"))
    can = available()
    meter = KernelMeter(f"demo{os.getpid() % 100000}", 2 * budget) if can.ok else None
    where = (
        "the inner in its own network namespace behind the kernel quota"
        if meter
        else (f"all on loopback (no kernel quota: {can.reason})")
    )
    console.print(f"uplimit demo: separate inner and outer processes, {where}; files in {workdir}")
    if meter:
        meter.create()
    try:
        loopback = ("127.0.0.1", "127.0.0.1")
        link_host, inner_address = (meter.outer_address, meter.inner_address) if meter else loopback
        config, port = _config(workdir, link_host, inner_address, budget)
        url = f"http://127.0.0.1:{port}"
        with _processes(workdir, config, meter) as (outer, inner):
            procs = {"outer": outer, "inner": inner}
            load_s = asyncio.run(_wait_serving(url, procs, workdir, console))
            console.print(f"link up after {load_s:.0f} s (models loaded, fingerprints agree)")
            answers, seconds = asyncio.run(_client(url, max_tokens, console))
        kernel = meter.read() if meter else None
    finally:
        if meter:
            meter.teardown()
    ledger = open_ledger(str(workdir / "ledger.db"))
    state = ledger.usage()
    ledger.close()
    console.print(_summary(answers, seconds, weights, state, kernel))


def _summary(
    answers: list[Answer],
    seconds: float,
    weights: int,
    state: LedgerState,
    kernel: KernelReading | None,
) -> Table:
    tokens = sum(a.tokens for a in answers)
    answer_bits = sum(a.bits for a in answers)
    payload = sum(a.payload_bits for a in answers)
    charged = 8 * state.usage.lifetime_bytes  # frames, framing, handshake, timing: everything
    gzip_bits = sum(a.gzip_bits for a in answers)
    rate = charged / max(seconds, 1e-9)
    table = Table("summary", "value", title="what crossed the uplink")
    table.add_row("answers / tokens", f"{len(answers)} / {tokens}")
    table.add_row(
        "bits in the answers' frames",
        f"{answer_bits:,.0f} ({answer_bits / max(tokens, 1):.3f} bits/token, of which the"
        f" tokens' own code {payload / max(tokens, 1):.3f})",
    )
    table.add_row(
        "gzip, each answer on its own",
        f"{gzip_bits:,} bits ({gzip_bits / max(tokens, 1):.1f} bits/token)",
    )
    table.add_row(
        "charged to the ledger (all-in)",
        f"{state.usage.lifetime_bytes:,} bytes "
        f"(wire {state.wire_bytes:,}, timing {state.timing_bytes:,})",
    )
    if kernel is not None:
        table.add_row(
            "kernel quota counted (IP bytes)",
            f"{kernel.sent_bytes:,} bytes, of which TCP payload {kernel.tcp_payload_bytes:,}",
        )
    table.add_row("strong weights", f"{weights:,} bytes")
    table.add_row("uploaded / weights", f"{state.usage.lifetime_bytes / weights:.2e}")
    used = 100 * state.usage.lifetime_bytes / state.budgets.lifetime_bytes
    table.add_row(
        "lifetime budget (1 % of the weights)",
        f"{state.budgets.lifetime_bytes:,} bytes; this run used {used:.4f} %",
    )
    table.add_row("strong tokens/s while answering", f"{tokens / max(seconds, 1e-9):.1f}")
    table.add_row(
        "an attacker owning the whole uplink, at this rate",
        f"{8 * weights / rate / 86400 / 365.25:,.1f} years for the weights ({rate:.0f} bits/s);"
        f" the lifetime budget stops them at 1 % of them",
    )
    return table
