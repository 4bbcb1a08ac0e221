"""The spot-check verifier in serving, in one process on the tiny pair: the verifier over real
sockets (verdicts, alarms, a malformed connection, a full queue, never a byte written), the
re-runs it needs (best-of-N, speculative drafts), what it refuses, the outer's feed (never
blocks, reconnects, alarms on a byte from the verifier) and the service hook that feeds it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import support
from support.net import free_port
from uplimit.both import in_process
from uplimit.coding.calibration import Calibration
from uplimit.coding.generate import Finish, Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.config import Config, load_config
from uplimit.errors import ConfigError
from uplimit.inner import spotcheck
from uplimit.inner.scheduler import Scheduler
from uplimit.inner.serve import scheduler_config
from uplimit.inner.service import InnerService
from uplimit.inner.spotcheck import Speculation, verify
from uplimit.inner.verifier import Verifier
from uplimit.link.budget import Budgets
from uplimit.link.ledger import SqliteLedger
from uplimit.link.metrics import OuterMetrics
from uplimit.outer.serve import configured_verifier_feed
from uplimit.outer.service import OuterService
from uplimit.outer.verifier_feed import VerifierFeed, bits_per_day
from uplimit.wire.checks import CHECK_PREAMBLE, CheckJob, CheckParser, encode_check
from uplimit.wire.frame import FrameConfig, FrameDecoder
from uplimit.wire.request import GenerationRequest, candidate_seed
from uplimit.wire.streams import StreamSpec


def _config(tmp_path: Path, extra: str = "") -> Config:
    path = tmp_path / "uplimit.toml"
    path.write_text(
        f"""
[coding]
max_context = 256
[verifier]
port = 0
verdicts = "{tmp_path / "verdicts.jsonl"}"
{extra}
"""
    )
    return load_config(path, env={})


def _spec(model, sid: int, t: float, seed: int = 11, max_tokens: int = 12) -> StreamSpec:
    return StreamSpec(sid, tuple(model.tokenize("def add(a, b):")), SamplingParams(t), seed,
                      max_tokens)  # fmt: skip


def _plain(model, spec: StreamSpec, candidate: int = 0) -> tuple[int, ...]:
    seed = candidate_seed(spec.seed, candidate)
    [gen], _ = generate(model, [Request(spec.prompt, spec.params, seed, spec.max_tokens)])
    return tuple(gen.tokens)


def _changed(tokens: tuple[int, ...], at: int, n_vocab: int) -> tuple[int, ...]:
    return (*tokens[:at], (tokens[at] + 1) % n_vocab, *tokens[at + 1 :])


def _verdicts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def _until(condition, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


def _count(counter, *labels: str) -> float:
    return (counter.labels(*labels) if labels else counter)._value.get()


@contextlib.asynccontextmanager
async def _running(verifier: Verifier) -> AsyncIterator[Verifier]:
    await verifier.start()
    try:
        yield verifier
    finally:
        await verifier.aclose()


# --- the verifier -----------------------------------------------------------------------------


def test_verdicts_over_a_real_socket_and_never_a_byte_back(tiny_strong, tmp_path):
    config = _config(tmp_path)
    n_vocab = tiny_strong.info.n_vocab
    greedy, sampled = _spec(tiny_strong, 1, 0.0), _spec(tiny_strong, 2, 0.7)
    best_of = _spec(tiny_strong, 3, 0.7, seed=5)
    second = _plain(tiny_strong, best_of, candidate=1)
    assert second != _plain(tiny_strong, best_of)  # candidate 1 is not candidate 0
    jobs = [
        CheckJob(greedy, _plain(tiny_strong, greedy)),
        CheckJob(sampled, _plain(tiny_strong, sampled)[:5]),  # a stop sequence cut it
        CheckJob(best_of, second, best_of=2),  # served: the second candidate
        CheckJob(best_of, second, best_of=1),  # the same tokens claimed as candidate 0's
        CheckJob(sampled, _changed(_plain(tiny_strong, sampled), 3, n_vocab)),
    ]

    async def main():
        async with _running(Verifier(config, tiny_strong)) as v:
            reader, writer = await asyncio.open_connection("127.0.0.1", v.port)
            writer.write(CHECK_PREAMBLE + b"".join(map(encode_check, jobs)))
            await writer.drain()
            await _until(lambda: len(_verdicts(v.verdicts_path)) == len(jobs))
            writer.write_eof()  # the verifier closes its side at our EOF: read to the end
            back = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return v.metrics, back

    metrics, back = asyncio.run(main())
    assert back == b""  # one-way: not one byte came back
    verdicts = _verdicts(tmp_path / "verdicts.jsonl")
    assert [v["agree"] for v in verdicts] == [True, True, True, False, False]
    assert [v["stream_id"] for v in verdicts] == [1, 2, 3, 3, 2]
    assert verdicts[4]["first_difference"] == 3 and verdicts[4]["checked_tokens"] == 12
    assert verdicts[1]["checked_tokens"] == 5 and verdicts[0]["seed"] == 11
    assert _count(metrics.checks, "agree") == 3 and _count(metrics.checks, "disagree") == 2
    assert _count(metrics.alarms, "spotcheck") == 2 and _count(metrics.alarms, "protocol") == 0


def test_a_malformed_connection_is_closed_and_alarmed_and_others_go_on(tiny_strong, tmp_path):
    config = _config(tmp_path)
    spec = _spec(tiny_strong, 7, 0.0)
    job = CheckJob(spec, _plain(tiny_strong, spec))

    async def main():
        async with _running(Verifier(config, tiny_strong)) as v:
            _, good = await asyncio.open_connection("127.0.0.1", v.port)
            good.write(CHECK_PREAMBLE)
            bad_reader, bad = await asyncio.open_connection("127.0.0.1", v.port)
            bad.write(CHECK_PREAMBLE + encode_check(job)[:-1] + b"\x81\x00" + b"x" * 40)
            assert await asyncio.wait_for(bad_reader.read(), 10) == b""  # closed, nothing said
            good.write(encode_check(job))  # the other connection is still served
            await _until(lambda: len(_verdicts(v.verdicts_path)) == 1)
            good.close()
            bad.close()
            return v.metrics

    metrics = asyncio.run(main())
    assert _count(metrics.alarms, "protocol") == 1
    assert [v["agree"] for v in _verdicts(tmp_path / "verdicts.jsonl")] == [True]


def test_a_full_queue_drops_checks_and_counts_them(tiny_strong, tmp_path):
    config = _config(tmp_path, "max_queue = 1")
    spec = _spec(tiny_strong, 1, 0.0)
    job = CheckJob(spec, _plain(tiny_strong, spec))
    checking, release = threading.Event(), threading.Event()

    async def main():
        verifier = Verifier(config, tiny_strong)
        check = verifier._check

        def busy_check(j: CheckJob):  # the model is busy until released
            checking.set()
            assert release.wait(30)
            return check(j)

        verifier._check = busy_check
        async with _running(verifier) as v:
            _, writer = await asyncio.open_connection("127.0.0.1", v.port)
            writer.write(CHECK_PREAMBLE + encode_check(job))
            await writer.drain()
            await _until(checking.is_set)  # one is being checked
            writer.write(encode_check(job) * 4)  # one waits, three find the queue full
            await writer.drain()
            await _until(lambda: _count(v.metrics.dropped) == 3)
            release.set()
            await _until(lambda: len(_verdicts(v.verdicts_path)) == 2)
            writer.close()
            return v.metrics

    metrics = asyncio.run(main())
    assert _count(metrics.dropped) == 3 and _count(metrics.checks, "agree") == 2


def test_it_refuses_what_it_cannot_re_run(tiny_strong, tmp_path):
    with pytest.raises(ConfigError, match="gauged serving"):
        Verifier(_config(tmp_path, "[gauge]\nperiod_s = 3600"), tiny_strong)
    with pytest.raises(ConfigError, match="withheld reasoning"):
        Verifier(_config(tmp_path, '[inner]\nreasoning_open = "<a>"\nreasoning_close = "</a>"'),
                 tiny_strong)  # fmt: skip
    with pytest.raises(ConfigError, match="needs the weak model"):
        Verifier(_config(tmp_path, "[inner]\ndraft_tokens = 2"), tiny_strong)


def test_speculative_streams_are_re_run_through_the_scheduler_with_drafts(
    tiny_strong, tiny_weak, tmp_path, monkeypatch
):
    config = _config(tmp_path, "[inner]\ndraft_tokens = 2\nmax_batch = 4")
    Verifier(config, tiny_strong, tiny_weak)  # with the weak model, it starts
    scheduler = Scheduler(tiny_strong, scheduler_config(config), drafter=tiny_weak)
    specs = [_spec(tiny_strong, 0, 0.0), _spec(tiny_strong, 1, 0.7, max_tokens=20)]
    for spec in specs:  # served next to each other, re-run alone
        scheduler.submit(GenerationRequest(spec, "r", best_of=2))
    while scheduler.step():
        pass
    served = [scheduler.candidate_tokens(s.stream_id) for s in specs]
    assert scheduler.drafted_tokens > 0
    scheduler.close()
    reruns: list[Scheduler] = []

    class Spy(Scheduler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            reruns.append(self)

    monkeypatch.setattr(spotcheck, "Scheduler", Spy)
    speculation = Speculation(tiny_weak, scheduler_config(config))
    n_vocab = tiny_strong.info.n_vocab
    for spec, candidates in zip(specs, served, strict=True):
        for tokens in candidates:  # greedy: one candidate; sampled: either of two
            job = CheckJob(spec, tuple(tokens), best_of=2)
            assert verify(tiny_strong, job, speculation=speculation).agree
        job = CheckJob(spec, _changed(tuple(candidates[-1]), 6, n_vocab), best_of=2)
        v = verify(tiny_strong, job, speculation=speculation)
        assert not v.agree and v.first_difference == 6
    assert reruns and all(r.drafted_tokens > 0 for r in reruns)


def test_config_validation_of_the_outer_side(tmp_path):
    def outer(lines: str) -> Config:
        return _config(tmp_path, f"[outer]\n{lines}")

    assert outer('verifier = "[::1]:7303"').outer.verifier_address == ("::1", 7303)
    assert outer("").outer.verifier_address is None
    for bad in ('verifier = "nohost"', 'verifier = "h:0"', 'verifier = ":7303"'):
        with pytest.raises(ConfigError, match="host:port"):
            outer(bad)
    for rate in ("1.5", "-0.1", "nan"):
        with pytest.raises(ConfigError, match="verify_rate"):
            outer(f"verify_rate = {rate}")
    reasoning = '[inner]\nreasoning_open = "<a>"\nreasoning_close = "</a>"\n'
    config = _config(tmp_path, reasoning + '[outer]\nverifier = "127.0.0.1:7303"')
    with pytest.raises(ConfigError, match="withheld reasoning"):
        configured_verifier_feed(config, OuterMetrics())  # the outer refuses to offer those streams


# --- the outer's feed -------------------------------------------------------------------------


def _request(sid: int, n_tokens: int = 3) -> tuple[GenerationRequest, tuple[int, ...]]:
    spec = StreamSpec(sid, (1, 2, 3), SamplingParams(0.7), sid, max(16, n_tokens))
    return GenerationRequest(spec, f"r{sid}"), tuple(range(4, 4 + n_tokens))


def test_the_feed_never_blocks_while_the_verifier_is_down_and_delivers_once_up():
    port = free_port()
    received: list[CheckJob] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = CheckParser()
        while data := await reader.read(1 << 16):
            received.extend(parser.feed(data))
        writer.close()

    async def main():
        metrics = OuterMetrics()
        feed = VerifierFeed("127.0.0.1", port, 1.0, metrics, max_queued_bytes=600,
                            tick_s=0.02, reconnect_s=0.05, max_connections=1000)  # fmt: skip
        feed.start()
        gaps, last = [], time.monotonic()
        queued = []
        for sid in range(40):  # offers return at once, connection attempts fail meanwhile
            t0 = time.perf_counter()
            queued.append(feed.offer(*_request(sid)))
            assert time.perf_counter() - t0 < 0.05
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
        assert max(gaps) < 0.5  # the event loop kept running
        assert 0 < sum(queued) < 40 and feed.unsent == 40 - sum(queued)  # bounded, counted
        server = await asyncio.start_server(sink, "127.0.0.1", port)
        await _until(lambda: len(received) == sum(queued), 10)
        assert feed.offer(*_request(99))  # the connection stays up for later checks
        await _until(lambda: len(received) == sum(queued) + 1, 10)
        await feed.aclose()
        server.close()
        return feed, metrics, queued

    feed, metrics, queued = asyncio.run(main())
    ids = [j.spec.stream_id for j in received]
    assert ids == [sid for sid, q in enumerate(queued) if q] + [99]  # in order, each once
    assert received[0].tokens == (4, 5, 6) and received[0].best_of == 1
    assert _count(metrics.spotchecks, "sent") == feed.sent == len(received)
    assert _count(metrics.spotchecks, "unsent") == feed.unsent == 40 - sum(queued)


def test_a_hostile_verifier_signals_only_connection_ends_at_ticks_and_few_of_them(caplog):
    """A real process tries each signal (refuse, close, write, stall, reset) at random moments:
    the outer sees only at which tick each connection ended and how, connects at most
    `max_connections` times, reads nothing, and alarms on the bytes and on the spent count."""
    tick = 0.5
    port = free_port()
    caplog.set_level("INFO", logger="uplimit.outer.verifier_feed")

    async def main():
        metrics = OuterMetrics()
        feed = VerifierFeed("127.0.0.1", port, 1.0, metrics, tick_s=tick, tick_bytes=4096,
                            reconnect_s=tick, max_connections=5)  # fmt: skip
        feed.start()

        async def offers():
            for sid in range(10_000):
                feed.offer(*_request(sid, n_tokens=200))
                await asyncio.sleep(0.01)

        offering = asyncio.create_task(offers())
        await _until(lambda: feed.ends, 10)  # nothing listens yet: refused
        hostile = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(support.__file__).parent / "hostile_verifier.py"), str(port),
            "close", "write", "stall", "reset", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            await _until(lambda: len(feed.ends) == 5 and feed.alarms == 2, 60)
            await asyncio.sleep(4 * tick)  # no sixth attempt comes
        finally:
            hostile.kill()
            offering.cancel()
            await feed.aclose()
        lines = (await hostile.stdout.read()).decode().split()
        return feed, metrics, lines

    feed, metrics, lines = asyncio.run(main())
    # The outer acted on each end at one of its ticks, whenever in the tick the verifier did it.
    ends = [
        r.created for r in caplog.records if "checks waiting" in r.message or "ALARM" in r.message
    ]
    phases = [((t - ends[0]) / tick + 0.5) % 1 - 0.5 for t in ends]
    assert len(ends) >= 5 and all(abs(p) < 0.3 for p in phases), phases
    hows = [how for _, _, how in feed.ends]
    # Linux reports a reset once, as an error, and as end-of-file after that: either is an end.
    assert hows[:4] == ["refused", "closed", "wrote", "stalled"] and hows[4] in ("reset", "closed")
    assert lines.count("conn") == 4  # 5 attempts, the first refused: then the count is spent
    assert _count(metrics.alarms, "verifier") == feed.alarms == 2  # the bytes; the count
    assert bits_per_day(tick, 5) == pytest.approx(5 * math.log2(5 * (86400 / tick + 1)))
    assert bits_per_day() == pytest.approx(449, abs=1)


def test_offers_follow_the_rate_and_skip_retrievals():
    async def main():
        feed = VerifierFeed("127.0.0.1", free_port(), 0.0)
        assert not any(feed.offer(*_request(sid)) for sid in range(200))
        feed.rate = 0.5
        picked = sum(feed.offer(*_request(sid)) for sid in range(400))
        assert 120 < picked < 280  # P(outside) < 1e-9 at rate 0.5
        feed.rate = 1.0
        request, tokens = _request(1)
        retrieval = GenerationRequest(request.spec, "w", withheld_id="r/1")
        assert not feed.offer(retrieval, tokens)
        assert not feed.offer(request, ())
        assert feed.offer(request, tokens)
        await feed.aclose()

    asyncio.run(main())


# --- the service hook -------------------------------------------------------------------------


def test_finished_streams_reach_the_hook_with_every_decoded_token(tiny_strong, tiny_weak, tmp_path):
    config = _config(tmp_path)
    cfg = scheduler_config(config)
    ended: list[tuple[GenerationRequest, tuple[int, ...]]] = []

    async def main():
        inner = InnerService(tiny_strong, tiny_weak, Calibration(), cfg)
        session = tiny_weak.session(cfg.max_streams, cfg.max_context + 1)
        decoder = FrameDecoder(session, tiny_weak.info.eos_ids, Calibration(),
                               FrameConfig(cfg.frame_tokens, tiny_weak.info.n_vocab))  # fmt: skip
        ledger = SqliteLedger(tmp_path / "ledger.db", Budgets(1 << 40))
        async with in_process(inner, decoder, tiny_weak.info, Calibration(), ledger, tmp_path,
                              tick_s=0.002) as pair:  # fmt: skip
            service = OuterService(tiny_weak, pair.uplink, max_context=cfg.max_context,
                                   on_stream_end=lambda r, t: ended.append((r, t)))  # fmt: skip
            service.start()
            prompt = tiny_strong.tokenize("def add(a, b):")
            subs = [
                await service.submit(prompt, SamplingParams(0.7), request_id="a", max_tokens=16,
                                     n=2, best_of=2, seed=3),
                await service.submit(prompt, SamplingParams(0.0), request_id="b", max_tokens=16),
            ]  # fmt: skip
            greedy = [
                tiny_strong.token_bytes(t)
                for t in _plain(tiny_strong, _spec(tiny_strong, 0, 0.0, 0, 16))
            ]
            stop = next(
                b.decode() for b in greedy[3:12] if b.strip() and b.isascii()
            )  # cuts it short
            subs.append(
                await service.submit(prompt, SamplingParams(0.0), request_id="c", max_tokens=16,
                                     stop=(stop,))
            )  # fmt: skip
            for choice in [c for s in subs for c in s.choices]:
                while choice.finished is None:
                    await choice.events.get()
            await _until(lambda: len(ended) == 4, 30)
            await service.aclose()
        ledger.close()
        session.close()
        return subs

    subs = asyncio.run(main())
    by_id = {r.spec.stream_id: (r, t) for r, t in ended}
    for choice in [c for s in subs for c in s.choices]:
        request, tokens = by_id[choice.stream_id]
        assert request is choice.request and list(tokens) == choice.decoded
        assert choice.finished.tokens <= len(tokens)  # tokens past a stop are in the check
        job = CheckJob(request.spec, tokens, request.best_of)
        assert verify(tiny_strong, job, max_context=256).agree
    assert subs[2].choices[0].finished.reason is Finish.STOP


def test_a_job_that_cannot_be_re_run_is_an_alarm_not_a_pass(tiny_strong, tmp_path):
    config = _config(tmp_path)  # max_context 256: this prompt does not fit
    spec = StreamSpec(4, (5,) * 300, SamplingParams(0.0), 0, 8)

    async def main():
        async with _running(Verifier(config, tiny_strong)) as v:
            _, writer = await asyncio.open_connection("127.0.0.1", v.port)
            writer.write(CHECK_PREAMBLE + encode_check(CheckJob(spec, (1, 2))))
            await _until(lambda: len(_verdicts(v.verdicts_path)) == 1)
            writer.close()
            return v.metrics

    metrics = asyncio.run(main())
    [verdict] = _verdicts(tmp_path / "verdicts.jsonl")
    assert not verdict["agree"] and verdict["error"]
    assert _count(metrics.checks, "error") == 1 and _count(metrics.alarms, "check_error") == 1
