"""`uplimit demo --tiers 3`: inner, relay and outer as separate processes (docs/tiers.md).

    researcher --HTTP--> relay process <--link 1--> inner process
    users --HTTP--> outer process <--link 2--> relay process

As root the inner and the relay are confined, each in its own namespace behind its kernel quota
(`inner.confine`, `relay.confine`).

The inner and the relay read the two-tier demo's config (`demo._config`: the relay is that
file's outer, and its `[relay]` section is link 2); the outer has its own file, naming link 2's
ports and secret and the relay's ledger. A researcher's question is answered on the relay
while the users' questions go to the outer, all at once; then each link's figures: what its
ledger charged (wire and timing) and the tokens it carried, and when confined what its kernel
quota passed (TCP payload since the namespace was made) beside its ledger's wire bytes. On exit
the outer, then the relay are sent SIGTERM (SHUTDOWN goes down each link), and the inner stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import openai
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from uplimit.demo import (
    DEMO_PROMPTS,
    MODEL_NAME,
    Answer,
    _ask,
    _charged,
    _config,
    _free_port,
    _ledger,
    _panel,
    _readable_models,
    _uplimit,
    _wait_serving,
    stop_in_order,
)
from uplimit.errors import BackendError
from uplimit.link.auth import create_secret
from uplimit.link.budget import Budgets
from uplimit.link.confine import confinable
from uplimit.link.kernel import KernelMeter, KernelReading
from uplimit.link.ledger import LedgerState, init_ledger
from uplimit.models import store

__all__ = ["RESEARCH_PROMPT", "run_tiers_demo"]

# Written for the demo: a question for a researcher in the intermediate tier.
RESEARCH_PROMPT = "Write a Python function that checks whether a string is a palindrome."
USER_TEMPERATURE = 0.7


def _configs(
    workdir: Path, meters: dict[str, str], budget: int, confined: bool
) -> tuple[Path, Path, int, int]:
    """(the inner's and relay's config, the outer's, the relay's HTTP port, the outer's)."""
    models = _readable_models(workdir)
    shared, relay_port = _config(
        workdir, models, meters["inner->relay"], budget, len(DEMO_PROMPTS) + 1
    )
    secret = create_secret(workdir / "relay.secret")
    # Link 2, as both its ends name it: the relay's [relay] and the outer's [link].
    link2 = f"""downlink_port = {_free_port()}
uplink_port = {_free_port()}
ledger = "{workdir / "ledger" / "relay-ledger.db"}"
lifetime_budget_bytes = {budget}
secret_file = "{secret}"
"""
    relay_meter = meters["relay->outer"]
    with shared.open("a") as f:
        f.write(
            f"""[relay]\n{link2}downlink_log = "{workdir / "outer" / "relay-downlink.jsonl"}"
kernel_meter = "{relay_meter}"
"""
        )
    outer, port = workdir / "outer.toml", _free_port()
    outer.write_text(
        f"""[models]
strong = "{models[0]}"
weak = "{models[1]}"
threads = 1
[coding]
max_streams = {len(DEMO_PROMPTS) + 1}
max_context = 1024
[link]
{link2}receive_counter = "{workdir / "outer-received.db"}"
[outer]
port = {port}
model_name = "{MODEL_NAME}"
metrics_port = 0
"""
        + (f'kernel_meter = "{relay_meter}"\n' if confined else "")
    )
    return shared, outer, relay_port, port


@contextlib.contextmanager
def _tiers(workdir: Path, shared: Path, outer: Path, confined: bool) -> Iterator[dict]:
    """Start outer, relay, inner; on exit stop them in that order and leave nothing behind."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    unconfined = [] if confined else ["--unconfined"]
    argv = {
        "outer": _uplimit("serve", "outer", "--config", str(outer)),
        "relay": _uplimit("serve", "relay", "--config", str(shared), *unconfined),
        "inner": _uplimit("serve", "inner", "--config", str(shared), *unconfined),
    }
    procs: dict[str, subprocess.Popen] = {}
    logs = {name: open(workdir / f"{name}.log", "w") for name in argv}  # noqa: SIM115
    try:
        for name, args in argv.items():
            procs[name] = subprocess.Popen(
                args, stdout=logs[name], stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        yield procs
    finally:
        # The inner stops when the relay's SHUTDOWN comes.
        stop_in_order(list(procs.values()), [p for name, p in procs.items() if name == "inner"])
        for log in logs.values():
            log.close()


async def _questions(
    relay_url: str, outer_url: str, max_tokens: int, console: Console
) -> tuple[list[Answer], list[Answer], float]:
    """The researcher's question on the relay and the users' at the outer, all at once."""
    research = [Answer(RESEARCH_PROMPT, 0.0)]
    users = [Answer(p, USER_TEMPERATURE) for p in DEMO_PROMPTS]
    clients = [
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=0)
        for url in (relay_url, outer_url)
    ]
    t0 = time.monotonic()
    try:
        with Progress(console=console, transient=True) as progress:
            asks = []
            for i, (client, answer) in enumerate(
                [(clients[0], a) for a in research] + [(clients[1], a) for a in users]
            ):
                task = progress.add_task(f"{answer.prompt[:40]}... (chars)", total=None)
                asks.append(_ask(client, answer, max_tokens, i, progress, task))
            await asyncio.gather(*asks)
    finally:
        for client in clients:
            await client.close()
    return research, users, time.monotonic() - t0


def run_tiers_demo(console: Console, *, max_tokens: int = 96, json_out: Path | None = None) -> dict:
    """The three-tier demo (module doc); returns its figures (what `json_out` gets)."""
    strong = store.status(store.STRONG)
    if not strong.verified or not store.status(store.WEAK).verified:
        raise BackendError("the model pair is not fetched: run `uplimit models fetch`")
    budget = Budgets.default_for(strong.path.stat().st_size).lifetime_bytes
    workdir = Path(tempfile.mkdtemp(prefix="uplimit-tiers-"))
    workdir.chmod(0o755)  # the confined inner's user reads its config and the models here
    can = confinable()  # the kernel meter, and nobody (the default user) runs this code
    meters = {"inner->relay": f"tiers{os.getpid() % 100000}",
              "relay->outer": f"relay{os.getpid() % 100000}"}  # fmt: skip
    where = (
        "the inner and the relay confined, each behind its kernel quota"
        if can.ok
        else f"unconfined ({can.reason})"
    )
    console.print(f"uplimit demo --tiers 3: inner, relay, outer processes, {where}; {workdir}")
    shared, outer, relay_port, outer_port = _configs(workdir, meters, budget, can.ok)
    ledgers = {"inner->relay": workdir / "ledger" / "ledger.db",
               "relay->outer": workdir / "ledger" / "relay-ledger.db"}  # fmt: skip
    for path in ledgers.values():
        init_ledger(path, Budgets(budget))  # `uplimit budget init [--relay]`
    relay_url, outer_url = f"http://127.0.0.1:{relay_port}", f"http://127.0.0.1:{outer_port}"
    try:
        with _tiers(workdir, shared, outer, can.ok) as procs:
            for url in (relay_url, outer_url):
                asyncio.run(_wait_serving(url, procs, workdir, console))
            console.print("both links up (models loaded, fingerprints agree)")
            before = {name: _ledger(path) for name, path in ledgers.items()}
            research, users, seconds = asyncio.run(
                _questions(relay_url, outer_url, max_tokens, console)
            )
            after = {name: _ledger(path) for name, path in ledgers.items()}
            # Read while they run: each launcher removes its namespace when it ends.
            kernels = {name: KernelMeter(meters[name], 1).read() if can.ok else None
                       for name in ledgers}  # fmt: skip
    finally:
        for model in workdir.glob("*.gguf"):  # links or copies of the pair: the originals stay
            model.unlink(missing_ok=True)
    for a in research + users:
        console.print(_panel(a))
    carried = {"inner->relay": research + users, "relay->outer": users}
    figures = {
        "links": [
            {"name": name, **_charged(before[name], after[name]),
             "tokens": sum(a.tokens for a in carried[name]),
             "kernel": _kernel(kernels[name], after[name])}
            for name in ledgers
        ],
        "relay_answers": [_answer(a) for a in research],
        "outer_answers": [_answer(a) for a in users],
        "seconds": seconds,
    }  # fmt: skip
    table = Table("link", "charged bytes", "of which timing", "tokens", "bits/token (all-in)")
    for link in figures["links"]:
        per_token = 8 * link["charged_bytes"] / max(link["tokens"], 1)
        table.add_row(link["name"], f"{link['charged_bytes']:,}", f"{link['timing_bytes']:,}",
                      str(link["tokens"]), f"{per_token:.3f}")  # fmt: skip
    console.print(table)
    for link in figures["links"]:
        if (k := link["kernel"]) is not None:
            console.print(
                f"{link['name']}: its kernel quota passed {k['tcp_payload_bytes']:,} bytes of"
                f" TCP payload ({k['sent_bytes']:,} IP bytes) since its namespace was made; its"
                f" ledger charged {k['ledger_wire_bytes']:,} wire bytes"
            )
    if json_out is not None:
        json_out.write_text(json.dumps(figures, indent=2))
        console.print(f"wrote {json_out}")
    return figures


def _kernel(reading: KernelReading | None, ledger: LedgerState) -> dict | None:
    """A link's kernel count (None unconfined) beside its ledger's wire bytes, both totals."""
    if reading is None:
        return None
    return {
        "tcp_payload_bytes": reading.tcp_payload_bytes,
        "sent_bytes": reading.sent_bytes,
        "served_bytes": reading.served_bytes,
        "ledger_wire_bytes": ledger.wire_bytes,
    }


def _answer(a: Answer) -> dict:
    return {"prompt": a.prompt, "temperature": a.temperature, "finish": a.finish,
            "tokens": a.tokens, "text": a.text}  # fmt: skip
