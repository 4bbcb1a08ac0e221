"""`uplimit load` against both services on the tiny pair over the real transport: what it
reports is what the ledger charged and what the answers carried."""

from __future__ import annotations

import asyncio

from support.waiting import stop_task, wait_healthy
from uplimit.inner.serve import serve_inner
from uplimit.link.ledger import open_ledger
from uplimit.load import LoadSettings, run_load
from uplimit.models.chat import Message
from uplimit.outer.serve import serve_outer
from uplimit.prompts import Prompt

PROMPTS = [
    Prompt("add", (Message(role="user", content="def add(a, b):"),)),
    Prompt("hello", (Message(role="user", content="Hello!"),)),
    Prompt("list", (Message(role="user", content="Sort a list in Python."),)),
]


def _charged(config) -> int:
    ledger = open_ledger(config.link.ledger)
    try:
        return ledger.usage().usage.lifetime_bytes
    finally:
        ledger.close()


def test_load_reports_the_ledgers_charge_and_every_answer(
    tiny_strong, tiny_weak, tiny_services_config
):
    config = tiny_services_config(outer={"status_interval_s": 0.5, "api_key": "k"})
    url = f"http://127.0.0.1:{config.outer.port}"

    async def main():
        outer = asyncio.create_task(serve_outer(config, tiny_weak))
        inner = asyncio.create_task(serve_inner(config, tiny_strong, tiny_weak))
        try:
            await wait_healthy(url)
            before = _charged(config)
            settings = LoadSettings(url, clients=3, requests_per_client=2, max_tokens=8,
                                    model="tiny", api_key="k")  # fmt: skip
            result = await run_load(settings, PROMPTS)
            after = _charged(config)
            refused = await run_load(
                LoadSettings(url, clients=2, requests_per_client=1, model="tiny", api_key="no"),
                PROMPTS,
            )
        finally:
            await stop_task(outer)
            await asyncio.wait_for(inner, 30)
        return before, result, after, refused

    before, result, after, refused = asyncio.run(main())
    assert len(result.answers) == 6
    assert [a.error for a in result.answers] == [None] * 6
    assert all(a.tokens > 0 and a.ttft_s is not None for a in result.answers)
    # The budget's usage over the run, read through /status.json, is the ledger's own.
    assert result.charged_source == "ledger"
    assert result.charged_bytes == after - before > 0
    s = result.summary()
    assert s["answers"] == 6 and s["errors"] == 0
    assert s["tokens"] == sum(a.tokens for a in result.answers)
    # All-in covers at least the tokens' own code and the frames that carried it.
    assert s["all_in_bits_per_token"] >= s["frame_bits_per_token"] >= s["payload_bits_per_token"]
    assert s["ttft_s"]["p95"] >= s["ttft_s"]["p50"] > 0
    # A wrong key: every answer is an error, said as the API said it.
    assert [a.error[:8] for a in refused.answers] == ["HTTP 401"] * 2
    assert refused.summary()["answers"] == 0
