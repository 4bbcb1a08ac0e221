"""The OpenAI-compatible gateway end to end, with the official openai client, on the tiny pair:
inner service + the production link ends + outer service + uvicorn on loopback. Every test runs
twice: the link's two connections in memory (`link.memory`), and over real TCP sockets on
loopback; after each, the meters must agree (received <= charged, the timing charged)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn

from support.scripted import ScriptedModel
from support.waiting import eventually
from uplimit import both
from uplimit.both import InProcess, in_process
from uplimit.coding.calibration import Calibration
from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.errors import InternalError
from uplimit.inner.audit import AuditStore
from uplimit.inner.scheduler import SchedulerConfig
from uplimit.inner.service import InnerService
from uplimit.link.budget import CONNECT_CHARGE_BYTES, Budgets
from uplimit.link.ledger import SqliteLedger
from uplimit.link.meter import ReceiveCounter
from uplimit.outer.app import ApiSettings, create_app
from uplimit.outer.service import OuterService
from uplimit.wire.frame import FrameConfig, FrameDecoder

MODEL = "tiny-strong"


class TcpNetwork:
    """The kernel's network, with `MemoryNetwork`'s two calls: asyncio's own."""

    start_server = staticmethod(asyncio.start_server)
    open_connection = staticmethod(asyncio.open_connection)


@pytest.fixture(autouse=True, params=["memory", "tcp"])
def transport(request, monkeypatch) -> str:
    """The link over memory, or over TCP on loopback (the ends are the same either way)."""
    if request.param == "tcp":
        monkeypatch.setattr(both, "MemoryNetwork", TcpNetwork)
        monkeypatch.setattr(both, "HOST", "127.0.0.1")
    return request.param


THINK = ("<think>", "</think>")


@dataclass
class Stack:
    client: openai.AsyncOpenAI
    url: str
    pair: InProcess
    audit: AuditStore
    ledger: SqliteLedger


@contextlib.asynccontextmanager
async def stack(strong, weak, tmp_path, *, budget=None, reasoning=None, api_key=None,
                admin_key=None, knobs=None, **config) -> AsyncIterator[Stack]:  # fmt: skip
    cfg = SchedulerConfig(**{"max_batch": 8, "max_context": 256, "frame_tokens": 4,
                             "reasoning": reasoning, **config})  # fmt: skip
    audit = AuditStore(tmp_path / "audit.db")
    ledger = SqliteLedger(tmp_path / "ledger.db", Budgets(budget or 1 << 40))
    inner = InnerService(strong, weak, Calibration(), cfg, audit=audit)
    session = weak.session(cfg.max_streams, cfg.max_context + 1)
    fc = FrameConfig(cfg.frame_tokens, weak.info.n_vocab, withheld_counts=reasoning is not None)
    decoder = FrameDecoder(session, weak.info.eos_ids, Calibration(), fc)
    try:
        async with in_process(inner, decoder, weak.info, Calibration(), ledger, tmp_path,
                              tick_s=0.002) as pair:  # fmt: skip
            service = OuterService(weak, pair.uplink, max_context=cfg.max_context,
                                   reasoning=reasoning)  # fmt: skip
            settings = ApiSettings(model_name=MODEL, api_key=api_key, admin_key=admin_key,
                                   reasoning=reasoning is not None, **(knobs or {}))  # fmt: skip
            app = create_app(service, settings)
            server = uvicorn.Server(
                uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
            )
            service.start()
            serving = asyncio.create_task(server.serve())
            # Started, or ended trying (then awaiting it raises what went wrong).
            await eventually(lambda: server.started or serving.done(), "uvicorn to start")
            if serving.done():
                await serving
            port = server.servers[0].sockets[0].getsockname()[1]
            url = f"http://127.0.0.1:{port}/v1"
            client = openai.AsyncOpenAI(base_url=url, api_key=api_key or "none", max_retries=0)
            try:
                yield Stack(client, url, pair, audit, ledger)
            finally:
                await client.close()
                server.should_exit = True
                await serving
                await service.aclose()
        # The meters: every byte the outer received was charged first, and so was the timing.
        counter = ReceiveCounter(tmp_path / "received.db")
        received, usage = counter.total(), ledger.usage()
        counter.close()
        assert received <= usage.wire_bytes
        if received:
            assert usage.timing_bytes > CONNECT_CHARGE_BYTES
    finally:
        session.close()
        audit.close()
        ledger.close()


def run(coro):
    return asyncio.run(coro)


CHAT = [{"role": "user", "content": "Hello!"}]


def test_chat_and_completions_round_trip(tiny_strong, tiny_weak, tmp_path):
    async def main():
        async with stack(tiny_strong, tiny_weak, tmp_path) as s:
            models = await s.client.models.list()
            assert [m.id for m in models.data] == [MODEL]
            r = await s.client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=20, temperature=0.7, seed=5
            )
            assert r.choices[0].finish_reason in ("stop", "length")
            assert r.usage.completion_tokens <= 20
            extra = r.model_extra["uplimit"]
            assert extra["seed"] == 5 and extra["uploaded_bits"] > 0
            (rec,) = s.audit.query(request_id=r.id)
            assert rec.seed == 5
            assert (
                tiny_strong.detokenize(
                    [t for t in rec.uploaded if t not in tiny_strong.info.eos_ids]
                )
                == r.choices[0].message.content
            )
            # Same seed, same answer; the audit's bits are what the outer counted.
            again = await s.client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=20, temperature=0.7, seed=5
            )
            assert again.choices[0].message.content == r.choices[0].message.content
            assert rec.bits_uploaded == pytest.approx(extra["uploaded_bits"], abs=1e-2)
            c = await s.client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=8,
                                                  temperature=0)  # fmt: skip
            assert c.object == "text_completion" and c.usage.completion_tokens <= 8

    run(main())


def test_streaming_matches_the_audit_record(tiny_strong, tiny_weak, tmp_path):
    async def main():
        async with stack(tiny_strong, tiny_weak, tmp_path) as s:
            stream = await s.client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=30, temperature=1.0, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            text, finish, chunks, usage = "", None, 0, None
            async for chunk in stream:
                chunks += 1
                if chunk.usage:
                    usage = chunk.usage
                for ch in chunk.choices:
                    text += ch.delta.content or ""
                    finish = ch.finish_reason or finish
            assert finish in ("stop", "length") and chunks > 3
            (rec,) = s.audit.query(request_id=chunk.id)
            expected = b"".join(
                tiny_strong.token_bytes(t) for t in rec.uploaded
                if t not in tiny_strong.info.eos_ids
            ).decode("utf-8", errors="replace")  # fmt: skip
            assert text == expected
            assert usage.completion_tokens == len(rec.uploaded)

    run(main())


def test_completions_stream_like_chat_with_the_uplimit_figures(tiny_strong, tiny_weak, tmp_path):
    async def main():
        async with stack(tiny_strong, tiny_weak, tmp_path) as s:
            args = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 12, "temperature": 0}
            whole = await s.client.completions.create(**args, seed=3)
            stream = await s.client.completions.create(
                **args, seed=3, stream=True, stream_options={"include_usage": True}
            )
            chunks = [c async for c in stream]
            text = "".join(ch.text for c in chunks for ch in c.choices)
            assert text == whole.choices[0].text
            assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
            last = chunks[-1]  # the usage chunk carries the same figures as chat's
            assert (
                last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
            )
            extra = last.model_extra["uplimit"]
            assert extra["seed"] == 3 and extra["uploaded_bits"] > 0
            assert extra["choices"][0]["tokens"] == last.usage.completion_tokens

    run(main())


def test_64_concurrent_streaming_clients(tiny_strong, tiny_weak, tmp_path):
    """Every response is byte-identical to the inner's audit record; nothing is lost."""

    async def one(s, i):
        stream = await s.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Question {i}?"}],
            max_tokens=5 + i % 20, temperature=[0.0, 0.7, 1.0][i % 3], seed=i, stream=True,
            stop=["e!"] if i % 7 == 0 else None,
        )  # fmt: skip
        text, rid, finish = "", None, None
        async for chunk in stream:
            rid = chunk.id
            for ch in chunk.choices:
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
        return rid, text, finish

    async def main():
        async with stack(tiny_strong, tiny_weak, tmp_path, max_batch=16, max_streams=64) as s:
            results = await asyncio.gather(*(one(s, i) for i in range(64)))
            assert len({rid for rid, _, _ in results}) == 64
            for i, (rid, text, finish) in enumerate(results):
                (rec,) = s.audit.query(request_id=rid)
                data = b"".join(
                    tiny_strong.token_bytes(t) for t in rec.uploaded
                    if t not in tiny_strong.info.eos_ids
                )  # fmt: skip
                if i % 7 == 0 and b"e!" in data:
                    assert finish == "stop"
                    data = data[: data.index(b"e!")]
                assert text == data.decode("utf-8", errors="replace"), i
                assert rec.seed == i and rec.bits_uploaded is not None
            total = sum(r.bits_uploaded for r in s.audit.query(last=100))
            assert total == pytest.approx(8 * sum(f.bytes for f in s.pair.frames), rel=1e-6)

    run(main())


def test_n_choices_and_best_of(tiny_strong, tiny_weak, tmp_path):
    async def main():
        async with stack(tiny_strong, tiny_weak, tmp_path) as s:
            r = await s.client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=10, temperature=1.0, n=3, seed=11,
                extra_body={"best_of": 3},
            )  # fmt: skip
            assert len(r.choices) == 3
            recs = s.audit.query(request_id=r.id)
            assert len(recs) == 9 and sum(x.chosen for x in recs) == 3
            uploaded = [x for x in recs if x.chosen]
            assert len(s.pair.frames) > 0
            for ch in r.choices:
                rec = uploaded[ch.index]
                assert ch.message.content == tiny_strong.detokenize(
                    [t for t in rec.uploaded if t not in tiny_strong.info.eos_ids]
                )

    run(main())


def test_reasoning_stays_inside_and_can_be_retrieved(tiny_strong, tiny_weak, tmp_path):

    script = tiny_strong.tokenize("<think>the secret plan</think>Answer:")
    strong = ScriptedModel(tiny_strong, script)

    async def main():
        async with stack(strong, tiny_weak, tmp_path, reasoning=THINK, admin_key="op") as s:
            r = await s.client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=6, temperature=0.7
            )
            text = r.choices[0].message.content
            assert text.startswith("Answer:") and "secret" not in text
            extra = r.model_extra["uplimit"]["choices"][0]
            wid = extra["withheld_id"]
            (rec,) = s.audit.query(request_id=r.id)
            assert extra["withheld_tokens"] == len(rec.withheld) >= 5  # the whole section
            # A streaming response says it in the chunk that carries finish_reason.
            stream = await s.client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=6, temperature=0.7, stream=True
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    last = chunk.model_extra["uplimit"]
            (rec,) = s.audit.query(request_id=chunk.id)
            assert last["withheld_tokens"] == len(rec.withheld)
            crossed = len(s.pair.frames)
            async with httpx.AsyncClient() as http:
                url = f"{s.url}/uplimit/withheld"
                # An operator's action: the admin key, not a user's.
                assert (await http.post(url, json={"id": wid})).status_code == 401
                got = await http.post(url, json={"id": wid},
                                      headers={"authorization": "Bearer op"})  # fmt: skip
            assert got.status_code == 200
            assert "the secret plan" in got.json()["text"]
            assert got.json()["uplimit"]["uploaded_bits"] > 0
            assert len(s.pair.frames) > crossed  # it crossed the uplink, charged

    run(main())


def test_bad_inputs_give_openai_errors(tiny_strong, tiny_weak, tmp_path):
    async def main():
        async with stack(tiny_strong, tiny_weak, tmp_path) as s:
            c = s.client
            with pytest.raises(openai.NotFoundError) as e:
                await c.chat.completions.create(model="gpt-9", messages=CHAT)
            assert e.value.code == "model_not_found"
            for kwargs, param in (
                ({"temperature": 2.5}, "temperature"),
                ({"top_p": 0}, "top_p"),
                ({"n": 0}, "n"),
                ({"max_tokens": 0}, "max_tokens"),
                ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
                ({"logprobs": True}, "logprobs"),
                ({"extra_body": {"best_of": 100}}, "best_of"),
            ):
                with pytest.raises(openai.BadRequestError) as e:
                    await c.chat.completions.create(model=MODEL, messages=CHAT, **kwargs)
                assert e.value.code == "invalid_value" and e.value.param == param, kwargs
            with pytest.raises(openai.BadRequestError) as e:
                await c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=100_000)
            assert e.value.code == "context_length_exceeded"
            with pytest.raises(openai.BadRequestError) as e:
                await c.chat.completions.create(model=MODEL, messages=[])
            with pytest.raises(openai.BadRequestError) as e:
                await c.completions.create(model=MODEL, prompt=[10**9])
            assert e.value.param == "prompt"
            # Past the protocol's own limit: once, the inner refused it and ended the link for
            # every user. It is refused here, and the link serves the next request.
            with pytest.raises(openai.BadRequestError) as e:
                await c.chat.completions.create(
                    model=MODEL, messages=CHAT, max_tokens=4, extra_body={"top_k": 2**32 + 1}
                )
            assert "top_k" in e.value.message
            r = await c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
            assert r.choices[0].message.content is not None

    run(main())


def test_compression_knobs_are_checked_served_and_reported(tiny_strong, tiny_weak, tmp_path):
    """tie_nats / tilt per request (extra_body) and as the server's defaults: strict 400s, the
    answer is the reference run with the weak model, and the uplimit object names the knob."""
    prompt = tuple(tiny_strong.chat_tokens(CHAT))

    def reference(params: SamplingParams, seed: int) -> list[int]:
        [g], _ = generate(tiny_strong, [Request(prompt, params, seed, 16)], weak=tiny_weak)
        return g.tokens

    async def main():
        async with stack(tiny_strong, tiny_weak, tmp_path, knobs={"tie_nats": 3.0}) as s:
            c = s.client
            for body, param, words in (
                ({"temperature": 0, "tie_nats": -1}, "tie_nats", "must be in [0, 10]"),
                ({"temperature": 0, "tie_nats": -0.0}, "tie_nats", "must be in [0, 10]"),
                ({"temperature": 0, "tie_nats": "1.0"}, "tie_nats", "valid number"),
                ({"temperature": 0, "tie_nats": True}, "tie_nats", "valid number"),
                ({"temperature": 0.7, "tie_nats": 1.0}, "tie_nats", "only at temperature 0"),
                ({"temperature": 0.7, "tilt": 1.5}, "tilt", "must be in [0, 1]"),
                ({"temperature": 0, "tilt": 0.5}, "tilt", "only at temperature > 0"),
            ):
                with pytest.raises(openai.BadRequestError) as e:
                    await c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,
                                                    extra_body=body)  # fmt: skip
                assert e.value.param == param and words in e.value.message, body
            for body, knob in (
                ({"temperature": 0}, {"tie_nats": 3.0}),  # the server's default
                ({"temperature": 0, "tie_nats": 0}, {}),  # off: the exact output
                ({"temperature": 0.7}, {}),  # the default applies at T = 0 only
                ({"temperature": 0.9, "tilt": 0.5}, {"tilt": 0.5}),
            ):
                r = await c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16,
                                                    seed=3, extra_body=body)  # fmt: skip
                extra = r.model_extra["uplimit"]["choices"][0]
                assert {k: extra[k] for k in ("tie_nats", "tilt") if k in extra} == knob, body
                params = SamplingParams(body["temperature"], **knob)
                (rec,) = s.audit.query(request_id=r.id)
                assert rec.uploaded == reference(params, 3), body
            stream = await c.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True
            )
            last = [chunk async for chunk in stream][-1]
            assert last.model_extra["uplimit"]["tie_nats"] == 3.0

    run(main())


def test_api_key(tiny_strong, tiny_weak, tmp_path):
    async def main():
        async with stack(tiny_strong, tiny_weak, tmp_path, api_key="sesame") as s:
            bad = openai.AsyncOpenAI(base_url=s.url, api_key="wrong", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                await bad.models.list()
            await bad.close()
            assert (await s.client.models.list()).data

    run(main())


def test_budget_exhausted_is_a_503(tiny_strong, tiny_weak, tmp_path):
    async def main():
        async with stack(tiny_strong, tiny_weak, tmp_path, budget=200) as s:
            with pytest.raises(openai.APIStatusError) as e:
                for _ in range(50):
                    await s.client.chat.completions.create(
                        model=MODEL, messages=CHAT, max_tokens=60, temperature=1.0
                    )
            assert e.value.status_code == 503
            assert e.value.code == "upload_budget_exhausted"
            assert s.ledger.usage().usage.lifetime_bytes <= 200
            async with httpx.AsyncClient() as http:
                health = await http.get(s.url.removesuffix("/v1") + "/health")
            assert health.status_code == 503 and health.json()["link"] == "exhausted"

    run(main())


def test_distill_collection_keeps_going_past_a_failed_request(tiny_strong, tiny_weak, tmp_path):
    """A request the gateway refuses (here: a prompt over the context) is logged and left out;
    the others are kept, and a rerun asks only for what is missing."""
    from uplimit.distill.collect import collect, load_answers
    from uplimit.prompts import Prompt

    prompts = [
        Prompt("short", ({"role": "user", "content": "Hello!"},)),
        Prompt("too-long", ({"role": "user", "content": "word " * 400},)),
        Prompt("other", ({"role": "user", "content": "Explain recursion."},)),
    ]
    out = tmp_path / "answers.jsonl"

    async def main():
        async with stack(tiny_strong, tiny_weak, tmp_path) as s:
            base = s.url.removesuffix("/v1")
            first = await collect(base, prompts, [0.0], out, model=MODEL, max_tokens=8)
            again = await collect(base, prompts, [0.0], out, model=MODEL, max_tokens=8)
            return first, again

    first, again = run(main())
    assert sorted(a.id for a in first) == sorted(a.id for a in again) == ["other", "short"]
    assert sorted(a.id for a in load_answers(out)) == ["other", "short"]  # nothing twice


def test_our_faults_are_500s_with_the_cause_logged(tiny_strong, tiny_weak, tmp_path, monkeypatch,
                                                   caplog):  # fmt: skip
    """A broken invariant is never the client's fault: 500, and the cause in the log."""

    async def broken(*args, **kwargs):
        raise InternalError("the stream table is out of step")

    monkeypatch.setattr(OuterService, "submit", broken)

    async def main():
        async with stack(tiny_strong, tiny_weak, tmp_path) as s:
            with pytest.raises(openai.InternalServerError) as e:
                await s.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
            assert e.value.status_code == 500

    with caplog.at_level(logging.ERROR, logger="uplimit.outer.app"):
        run(main())
    assert "the stream table is out of step" in caplog.text
