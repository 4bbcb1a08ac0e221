"""Both services over the real transport (two TCP connections, metered), on the tiny pair,
in one process: `serve_outer` and `serve_inner` as `uplimit serve both` runs them."""

from __future__ import annotations

import asyncio
import re

import httpx
import openai

from support.net import free_port
from support.waiting import stop_task, wait_healthy
from uplimit.inner.audit import AuditStore
from uplimit.inner.serve import serve_inner
from uplimit.link.ledger import open_ledger
from uplimit.link.meter import ReceiveCounter
from uplimit.outer.serve import serve_outer


def test_openai_client_over_the_real_link(tiny_strong, tiny_weak, tiny_services_config):
    # The port comes from the environment: overrides work.
    port, metrics_port = free_port(), free_port()
    env = {"UPLIMIT_OUTER_PORT": str(port), "UPLIMIT_OUTER_METRICS_PORT": str(metrics_port)}
    config = tiny_services_config(env=env)
    assert config.outer.port == port

    async def main():
        outer = asyncio.create_task(serve_outer(config, tiny_weak))
        inner = asyncio.create_task(serve_inner(config, tiny_strong, tiny_weak))
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        r = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=12,
            temperature=0.7, seed=3,
        )  # fmt: skip
        stream = await client.completions.create(
            model="tiny", prompt="def f(x):", max_tokens=10, temperature=0, stream=True
        )
        streamed, sid = "", None
        async for chunk in stream:
            sid = chunk.id
            streamed += "".join(c.text for c in chunk.choices)
        await client.close()
        async with httpx.AsyncClient() as http:  # Prometheus, on the outer side only
            metrics = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        await stop_task(outer)  # as SIGTERM would: the outer sends SHUTDOWN, the inner stops
        reason = await asyncio.wait_for(inner, 30)
        return r, streamed, sid, reason, metrics

    r, streamed, sid, reason, metrics = asyncio.run(main())
    frames = re.search(r'^uplimit_frames_total\{outcome="decoded"\} (\S+)$', metrics, re.M)
    assert frames and float(frames.group(1)) > 0
    assert reason.name == "SHUTDOWN"
    audit = AuditStore(config.inner.audit)
    records = audit.query(last=10)
    audit.close()
    # Request options travel in OPEN_STREAM's extra: the audit has the API's ids.
    first, second = reversed(records)
    assert (first.request_id, second.request_id) == (r.id, sid)
    eos = tiny_strong.info.eos_ids
    assert r.choices[0].message.content == tiny_strong.detokenize(
        [t for t in first.uploaded if t not in eos]
    )
    assert first.seed == 3 and r.model_extra["uplimit"]["seed"] == 3
    assert streamed == tiny_strong.detokenize([t for t in second.uploaded if t not in eos])
    # Meters: the ledger charged at least every byte the outer received.
    ledger = open_ledger(config.link.ledger)
    counter = ReceiveCounter(config.link.receive_counter)
    charged, received = ledger.usage().wire_bytes, counter.total()
    ledger.close()
    counter.close()
    assert 0 < received <= charged
