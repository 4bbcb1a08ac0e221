"""The services demo: inner and outer as separate processes, a client talking OpenAI to them.

    this process (client)  --HTTP-->  outer process  <--link (2 x TCP)-->  inner process
                                     (weak model)                          (strong + weak)

As root with nftables, `uplimit serve inner` confines itself (`inner.confine`: its own network
namespace behind the kernel quota, an unprivileged user, charge-only access to the ledger);
otherwise, or when that user cannot run this checkout (`link.confine.confinable`, e.g. one
under a 0700 directory), it runs `--unconfined` on loopback (with its ALARM line in inner.log)
and says why at the start. Everything
lives in a fresh directory (config, ledger, audit store, logs, hard links to the model pair
that the inner's user can read), so the budget used is this run's. The client sends a fixed
set of prompts at T = 0 and T = 0.7, streaming, and shows each answer with its tokens, uplink
bits and what gzip would need for the same text. Then `clients` more clients ask at once
(`uplimit.load`), so that the figure at scale stands next to the few-users one; then a summary
against the strong weights (`--json` writes it).
On exit (also on Ctrl-C or a failure) the outer is sent SIGTERM, which shuts the link down
(SHUTDOWN), the inner stops (its launcher removes the namespace), and anything left is killed
by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from uplimit.errors import BackendError
from uplimit.link.agreement import read_meters
from uplimit.link.auth import create_secret
from uplimit.link.budget import Budgets
from uplimit.link.confine import confinable
from uplimit.link.kernel import KernelMeter, KernelReading
from uplimit.link.ledger import LedgerState, init_ledger
from uplimit.load import LoadResult, LoadSettings, run_load
from uplimit.models import store
from uplimit.prompts import training_set

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
AT_SCALE_MAX_TOKENS = 32  # each of the many clients' answers: enough to fill frames


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


def _config(
    workdir: Path, models: tuple[Path, Path], meter: str, budget: int, streams: int
) -> tuple[Path, int]:
    """The demo's config file (room for `streams` at once; the link's secret, 0600, beside
    it), and the outer's HTTP port. The ledger has a directory of its own: the confined inner
    may write the inner/ directory, never the ledger's (nor may a confined relay, whose files
    are the outer/ directory's: the three-tier demo's relay is this file's outer)."""
    path, port = workdir / "uplimit.toml", _free_port()
    secret = create_secret(workdir / "link.secret")
    for files in ("ledger", "inner", "outer"):  # a confined side's launcher takes its own over
        (workdir / files).mkdir()
    path.write_text(
        f"""[models]
strong = "{models[0]}"
weak = "{models[1]}"
threads = 1  # three model contexts share the cores: more threads only spin
[coding]
max_streams = {streams}
max_context = 1024
[link]
downlink_port = {_free_port()}
uplink_port = {_free_port()}
ledger = "{workdir / "ledger" / "ledger.db"}"
lifetime_budget_bytes = {budget}
downlink_log = "{workdir / "inner" / "downlink.jsonl"}"
receive_counter = "{workdir / "outer" / "received.db"}"
secret_file = "{secret}"
max_latency_s = 1.0
[inner]
max_batch = {streams}
audit = "{workdir / "inner" / "audit.db"}"
received_models = "{workdir / "inner" / "received"}"
rollout_record = "{workdir / "inner" / "rollout.json"}"
[outer]
status_interval_s = 1.0  # `uplimit load` waits for a fresh budget sample
port = {port}
model_name = "{MODEL_NAME}"
metrics_port = {_free_port()}
kernel_meter = "{meter}"
rollout_record = "{workdir / "outer" / "rollout.json"}"
"""
    )
    return path, port


def _uplimit(*args: str) -> list[str]:
    return [sys.executable, "-c", "from uplimit.cli import main; main()", *args]


@contextlib.contextmanager
def _processes(
    workdir: Path, config: Path, confined: bool
) -> Iterator[tuple[subprocess.Popen, subprocess.Popen]]:
    """Start outer then inner; on exit stop them in that order and leave nothing behind."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = [open(workdir / f"{side}.log", "w") for side in ("outer", "inner")]  # noqa: SIM115
    procs: list[subprocess.Popen] = []
    try:
        for side, log in zip(("outer", "inner"), logs, strict=True):
            extra = ["--unconfined"] if side == "inner" and not confined else []
            argv = _uplimit("serve", side, "--config", str(config), *extra)
            options = {"stdout": log, "stderr": subprocess.STDOUT, "env": env}
            procs.append(subprocess.Popen(argv, start_new_session=True, **options))
        yield procs[0], procs[1]
    finally:
        # SIGTERM to the outer: uvicorn exits, the outer sends SHUTDOWN, the inner ends.
        stop_in_order(procs, procs[1:2])
        for log in logs:
            log.close()


def stop_in_order(procs: Sequence[subprocess.Popen], ending: Sequence[subprocess.Popen]) -> None:
    """Stop `procs` in order: SIGTERM, then SIGKILL after STOP_TIMEOUT_S. Those in `ending`
    stop by themselves once an earlier one has (SHUTDOWN on the link): they get that long
    first."""
    for proc in procs:
        if proc in ending:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT_S)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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


def _readable_models(workdir: Path) -> tuple[Path, Path]:
    """Hard links (or copies) of the pair in `workdir`: $UPLIMIT_HOME may sit in a directory
    the confined inner's user cannot enter (root's home)."""
    links = []
    for spec in (store.STRONG, store.WEAK):
        source = store.status(spec).path
        link = workdir / source.name
        try:
            os.link(source, link)
        except OSError:  # another filesystem (a tmpfs /tmp, say): a copy, removed at the end
            shutil.copyfile(source, link)
        links.append(link)
    return links[0], links[1]


def run_service_demo(
    console: Console, *, max_tokens: int = 96, clients: int = 32, json_out: Path | None = None
) -> dict:
    """The whole demo (module doc); returns its figures (what `json_out` gets). Raises
    BackendError if a side fails to start."""
    strong = store.status(store.STRONG)
    if not strong.verified or not store.status(store.WEAK).verified:
        raise BackendError("the model pair is not fetched: run `uplimit models fetch`")
    weights = strong.path.stat().st_size
    budget = Budgets.default_for(weights).lifetime_bytes
    workdir = Path(tempfile.mkdtemp(prefix="uplimit-demo-"))
    workdir.chmod(0o755)  # the confined inner's user reads its config and the models here
    can = confinable()  # the kernel meter, and nobody (the default user) runs this code
    meter = f"demo{os.getpid() % 100000}"
    where = (
        "the inner confined in its own network namespace behind the kernel quota, as an"
        " unprivileged user with charge-only access to the ledger"
        if can.ok
        else f"all on loopback, the inner unconfined ({can.reason})"
    )
    console.print(f"uplimit demo: separate inner and outer processes, {where}; files in {workdir}")
    models = _readable_models(workdir)
    streams = max(len(DEMO_PROMPTS), clients)
    config, port = _config(workdir, models, meter, budget, streams)
    ledger = workdir / "ledger" / "ledger.db"
    init_ledger(ledger, Budgets(budget))  # `uplimit budget init`
    url = f"http://127.0.0.1:{port}"
    at_scale = None
    try:
        with _processes(workdir, config, can.ok) as (outer, inner):
            procs = {"outer": outer, "inner": inner}
            load_s = asyncio.run(_wait_serving(url, procs, workdir, console))
            console.print(f"link up after {load_s:.0f} s (models loaded, fingerprints agree)")
            start = _ledger(ledger)
            answers, seconds = asyncio.run(_client(url, max_tokens, console))
            few = _ledger(ledger)
            if clients:
                at_scale = _at_scale(url, clients, console)
            end = _ledger(ledger)
            # Read while the inner runs: its launcher removes the namespace when it ends.
            kernel = KernelMeter(meter, 1).read() if can.ok else None
    finally:
        for model in models:  # links or copies of the pair: the originals stay
            model.unlink(missing_ok=True)
    figures = _figures(answers, seconds, start, few, at_scale, end, kernel, weights)
    console.print(_summary(figures, end))
    if json_out is not None:
        json_out.write_text(json.dumps(figures, indent=2))
        console.print(f"wrote {json_out}")
    return figures


def _ledger(path: Path) -> LedgerState:
    """The ledger's state now, read-only (the inner keeps charging it)."""
    state = read_meters(ledger=str(path)).ledger
    assert state is not None  # read_meters was given a ledger
    return state


def _at_scale(url: str, clients: int, console: Console) -> LoadResult:
    """`clients` streaming clients at once, one answer each (training-set prompts)."""
    settings = LoadSettings(url, clients, requests_per_client=1, max_tokens=AT_SCALE_MAX_TOKENS,
                            temperature=0.7, model=MODEL_NAME)  # fmt: skip
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"{clients} clients at once (answers)", total=clients)
        result = asyncio.run(
            run_load(settings, training_set(clients), on_answer=lambda _: progress.advance(task))
        )
    if any(a.error for a in result.answers):
        errors = sorted({a.error for a in result.answers if a.error})
        raise BackendError(f"the concurrent phase had errors: {'; '.join(errors)}")
    return result


def _charged(before: LedgerState, after: LedgerState) -> dict[str, int]:
    return {
        "charged_bytes": after.usage.lifetime_bytes - before.usage.lifetime_bytes,
        "wire_bytes": after.wire_bytes - before.wire_bytes,
        "timing_bytes": after.timing_bytes - before.timing_bytes,
    }


def _figures(
    answers: list[Answer],
    seconds: float,
    start: LedgerState,
    few: LedgerState,
    at_scale: LoadResult | None,
    end: LedgerState,
    kernel: KernelReading | None,
    weights: int,
) -> dict:
    """The demo's figures, JSON-ready: the few answers' (top level), the concurrent phase's,
    and the whole run's. A phase's charge is the ledger's growth over it."""
    scale = None
    if at_scale is not None:
        s = at_scale.summary()
        scale = {
            "clients": s["clients"],
            "answers": s["answers"],
            "tokens": s["tokens"],
            **_charged(few, end),
            "frame_bits": sum(a.bits for a in at_scale.answers),
            "payload_bits": sum(a.payload_bits for a in at_scale.answers),
            "seconds": s["seconds"],
            "ttft_s": s["ttft_s"],
            "between_chunks_s": s["between_chunks_s"],
        }
    return {
        "tokens": sum(a.tokens for a in answers),
        **_charged(start, few),
        "frame_bits": sum(a.bits for a in answers),
        "payload_bits": sum(a.payload_bits for a in answers),
        "seconds": seconds,
        "answers": [
            {
                "prompt": a.prompt, "temperature": a.temperature, "finish": a.finish,
                "tokens": a.tokens, "frame_bits": a.bits, "payload_bits": a.payload_bits,
                "gzip_bits": a.gzip_bits, "text": a.text,
            }
            for a in answers
        ],
        "at_scale": scale,
        "link_setup_bytes": start.usage.lifetime_bytes,  # the connection's charge, handshake
        "total_charged_bytes": end.usage.lifetime_bytes,
        "kernel": None if kernel is None else {
            "sent_bytes": kernel.sent_bytes, "tcp_payload_bytes": kernel.tcp_payload_bytes,
        },
        "weights_bytes": weights,
        "lifetime_budget_bytes": end.budgets.lifetime_bytes,
    }  # fmt: skip


def _per_token(bits: float, tokens: int) -> str:
    return f"{bits / max(tokens, 1):.3f}"


def _summary(f: dict, end: LedgerState) -> Table:
    tokens, charged = f["tokens"], f["charged_bytes"]
    gzip_bits = sum(a["gzip_bits"] for a in f["answers"])
    rate = 8 * charged / max(f["seconds"], 1e-9)
    table = Table("summary", "value", title="what crossed the uplink")
    table.add_row("answers / tokens", f"{len(f['answers'])} / {tokens}")
    table.add_row(
        "bits in the answers' frames",
        f"{f['frame_bits']:,.0f} ({_per_token(f['frame_bits'], tokens)} bits/token, of which"
        f" the tokens' own code {_per_token(f['payload_bits'], tokens)})",
    )
    table.add_row(
        "gzip, each answer on its own",
        f"{gzip_bits:,} bits ({gzip_bits / max(tokens, 1):.1f} bits/token)",
    )
    table.add_row(
        "charged while answering (all-in)",
        f"{charged:,} bytes = {_per_token(8 * charged, tokens)} bits/token "
        f"(wire {f['wire_bytes']:,}, timing {f['timing_bytes']:,})",
    )
    if (s := f["at_scale"]) is not None:
        table.add_row(
            f"{s['clients']} clients at once (all-in)",
            f"{s['answers']} answers, {s['tokens']} tokens, {s['charged_bytes']:,} bytes = "
            f"{_per_token(8 * s['charged_bytes'], s['tokens'])} bits/token (the tokens' own "
            f"code {_per_token(s['payload_bits'], s['tokens'])}); first text after "
            f"{s['ttft_s']['p50']:.1f} s (median), {s['ttft_s']['p95']:.1f} s (p95)",
        )
    table.add_row(
        "charged to the ledger, whole run",
        f"{end.usage.lifetime_bytes:,} bytes (wire {end.wire_bytes:,}, timing "
        f"{end.timing_bytes:,}; the link's set-up {f['link_setup_bytes']:,})",
    )
    if (k := f["kernel"]) is not None:
        table.add_row(
            "kernel quota counted (IP bytes)",
            f"{k['sent_bytes']:,} bytes, of which TCP payload {k['tcp_payload_bytes']:,}",
        )
    weights = f["weights_bytes"]
    table.add_row("strong weights", f"{weights:,} bytes")
    table.add_row("uploaded / weights", f"{end.usage.lifetime_bytes / weights:.2e}")
    used = 100 * end.usage.lifetime_bytes / end.budgets.lifetime_bytes
    table.add_row(
        "lifetime budget (1 % of the weights)",
        f"{end.budgets.lifetime_bytes:,} bytes; this run used {used:.4f} %",
    )
    table.add_row("strong tokens/s while answering", f"{tokens / max(f['seconds'], 1e-9):.1f}")
    table.add_row(
        "an attacker owning the whole uplink, at this rate",
        f"{8 * weights / rate / 86400 / 365.25:,.1f} years for the weights ({rate:.0f} bits/s);"
        f" the lifetime budget stops them at 1 % of them",
    )
    return table
