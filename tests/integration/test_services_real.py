"""The services on the real pair, over the real transport, in one process (short answers):
what the client gets is exactly what the strong model generates on its own with the same seeds,
and it costs few bits per token."""

from __future__ import annotations

import asyncio
import socket

import openai
import pytest

from support.config import init_ledger_for
from support.waiting import stop_task, wait_healthy
from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.config import load_config
from uplimit.inner.audit import AuditStore
from uplimit.inner.serve import serve_inner
from uplimit.link.auth import create_secret
from uplimit.outer.serve import serve_outer

pytestmark = pytest.mark.real

PROMPTS = (
    "What does the HTTP status code 404 mean?",
    "Write a Python one-liner to reverse a list.",
)
MAX_TOKENS = 24


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_pair_end_to_end(real_strong, real_weak, tmp_path):
    config_file = tmp_path / "uplimit.toml"
    config_file.write_text(
        f"""
[coding]
max_streams = 4
max_context = 512
[link]
downlink_port = {_port()}
uplink_port = {_port()}
ledger = "{tmp_path / "ledger.db"}"
downlink_log = "{tmp_path / "down.jsonl"}"
receive_counter = "{tmp_path / "received.db"}"
secret_file = "{tmp_path / "link.secret"}"
max_latency_s = 0.3
[inner]
max_batch = 4
audit = "{tmp_path / "audit.db"}"
[outer]
port = {_port()}
model_name = "real"
metrics_port = 0
"""
    )
    config = load_config(config_file, env={})
    init_ledger_for(config)
    create_secret(config.link.secret_file)
    url = f"http://127.0.0.1:{config.outer.port}"

    async def ask(client, prompt, t):
        stream = await client.chat.completions.create(
            model="real", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS,
            temperature=t, seed=17, stream=True,
        )  # fmt: skip
        text, rid, extra = "", None, {}
        async for chunk in stream:
            rid = chunk.id
            for ch in chunk.choices:
                text += ch.delta.content or ""
                if ch.finish_reason:
                    extra = chunk.model_extra["uplimit"]
        return rid, text, extra

    async def main():
        outer = asyncio.create_task(serve_outer(config, real_weak))
        inner = asyncio.create_task(serve_inner(config, real_strong, real_weak))
        await wait_healthy(url, timeout_s=120)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        jobs = [ask(client, p, t) for t in (0.0, 0.7) for p in PROMPTS]
        results = await asyncio.gather(*jobs)
        await client.close()
        await stop_task(outer)
        assert (await asyncio.wait_for(inner, 60)).name == "SHUTDOWN"
        return results

    results = asyncio.run(main())
    audit = AuditStore(config.inner.audit)
    eos = real_strong.info.eos_ids
    payload = tokens = 0.0
    for (rid, text, extra), (t, prompt) in zip(
        results, [(t, p) for t in (0.0, 0.7) for p in PROMPTS], strict=True
    ):
        (rec,) = audit.query(request_id=rid)
        assert text == real_strong.detokenize([x for x in rec.uploaded if x not in eos])
        # Exactly the strong model's own output for this prompt, parameters and seed.
        ids = tuple(real_strong.chat_tokens([{"role": "user", "content": prompt}]))
        (alone,), _ = generate(real_strong, [Request(ids, SamplingParams(t), 17, MAX_TOKENS)])
        assert rec.uploaded == alone.tokens
        assert extra["uploaded_bits"] == pytest.approx(rec.bits_uploaded, abs=0.01)
        payload += extra["payload_bits"]
        tokens += extra["tokens"]
    audit.close()
    assert payload / tokens < 2.0  # the codec's own cost: ~0.5-1 bit/token on this pair
