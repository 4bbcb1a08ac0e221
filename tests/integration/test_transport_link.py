"""The link's transport end to end: real processes, real sockets, the real codec on the tiny
model pair, the real ledger, receive counter and (where there is root and nft) kernel meter.

The inner side runs as a separate process (`_INNER`); the outer side runs in the test process.
Misbehaving peers are played by raw sockets in the test process: they have no meter at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from uplimit.coding.calibration import Calibration
from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.errors import LinkClosed
from uplimit.link.auth import (
    CHALLENGE_BYTES,
    CHALLENGE_MAGIC,
    NONCE_BYTES,
    PROOF_BYTES,
    RESPONSE_BYTES,
    create_secret,
    inner_proof,
    load_secret,
    new_nonce,
    outer_proof,
)
from uplimit.link.budget import CONNECT_CHARGE_BYTES, Budgets
from uplimit.link.inner_link import END_RESERVE_BYTES
from uplimit.link.ledger import SqliteLedger
from uplimit.link.meter import ReceiveCounter, unproved
from uplimit.link.metrics import OuterMetrics, serve_metrics
from uplimit.link.outer_link import OuterLink
from uplimit.wire.fingerprint import codec_fingerprint, fingerprint_digest
from uplimit.wire.frame import (
    FrameConfig,
    FrameContent,
    FrameDecoder,
    FrameEncoder,
    encode_end,
    max_frame_bytes,
)
from uplimit.wire.protocol import (
    DOWNLINK_PREAMBLE,
    RESYNC,
    Accept,
    Cancel,
    DownlinkLimits,
    DownlinkParser,
    End,
    EndReason,
    Frame,
    Hello,
    LedgerReport,
    Resend,
    encode_downlink,
    encode_uplink,
)
from uplimit.wire.receiver import AlarmKind, LinkState
from uplimit.wire.streams import StreamSpec

K = 4  # tokens per stream per frame
TICK = 0.005
HOST = "127.0.0.1"
# Upper bound for waits on the inner process: starting Python with torch and the tiny pair
# takes ~10 s here, several times that on a machine whose CPUs other jobs hold.
SLOW = 240
# An accept (5 bytes) and the ledger report after it (19 bytes while the ledger's total is
# below 128: only the connection charge and the accept are charged before it here).
VERDICT = 5 + len(encode_uplink(LedgerReport(bytes(16), 0, False)))

# The inner process. "coded": answers each stream when it opens, with the tiny strong model, or
# with `random_answer` (~10 bits a token: spends a budget quickly) if the stream's service
# fields (OPEN_STREAM extra) say {"answer": "random"}; then frames K tokens of every active
# stream per tick with the real FrameEncoder. "idle": the fingerprint from the config, never a
# frame, no model to load (handshake, shutdown and downlink tests).
# Prints one JSON line: {"end": reason} or {"error": type, "message": ...} (exit 3).
_INNER = r"""
import asyncio, json, random, sys
cfg = json.loads(sys.argv[1])

def random_answer(spec, n_vocab, eos):
    allowed = [t for t in range(n_vocab) if t not in eos]
    return random.Random(spec.seed).choices(allowed, k=spec.max_tokens)

from uplimit.errors import UplimitError
from uplimit.link.auth import load_secret
from uplimit.link.ledger import SqliteLedger
from uplimit.link.inner_link import InnerLink, serve_frames
from uplimit.wire.protocol import DownlinkLimits

class Idle:
    def open_stream(self, spec, extra): pass
    def cancel(self, stream_id): pass
    def next_frame(self): return None
    def resend(self, first): return []

class Coded:
    def __init__(self, strong_dir, weak_dir, k):
        import torch
        torch.set_num_threads(1)
        from uplimit.coding.calibration import Calibration
        from uplimit.models.hf import HFModel
        from uplimit.wire.fingerprint import codec_fingerprint
        from uplimit.wire.frame import FrameConfig, FrameEncoder
        self.strong, weak = HFModel(strong_dir), HFModel(weak_dir)
        config = FrameConfig(k, weak.info.n_vocab)
        self.fingerprint = codec_fingerprint(weak.info, Calibration(), config)
        self.enc = FrameEncoder(weak.session(64, 512), weak.info.eos_ids, Calibration(), config)
        self.k, self.todo, self.cancelled, self.info = k, {}, set(), weak.info

    def open_stream(self, spec, extra):
        from uplimit.coding.generate import Request, generate
        self.enc.add_stream(spec)
        if json.loads(extra or b"{}").get("answer") == "random":
            self.todo[spec.stream_id] = random_answer(spec, self.info.n_vocab, self.info.eos_ids)
            return
        req = Request(spec.prompt, spec.params, spec.seed, spec.max_tokens)
        (gen,), _ = generate(self.strong, [req], max_context=512)
        self.todo[spec.stream_id] = list(gen.tokens)

    def cancel(self, stream_id):
        self.cancelled.add(stream_id)

    def next_frame(self):
        from uplimit.wire.frame import FrameContent
        table = self.enc.table
        streams = [*table.active, *(s.stream_id for s in table.pending)]
        if not streams:
            return None
        ended = {s for s in streams if s in self.cancelled}
        self.cancelled -= ended
        tokens = {}
        for s in streams:
            if s not in ended and self.todo[s]:
                tokens[s] = tuple(self.todo[s][: self.k])
                del self.todo[s][: self.k]
        content = FrameContent(len(table.pending), tokens, frozenset(ended))
        return self.enc.encode(content)[0]

    def resend(self, first):
        return self.enc.resend(first)

async def main():
    source = Coded(*cfg["pair"], cfg["k"]) if cfg.get("pair") else Idle()
    fingerprint = cfg.get("fingerprint") or source.fingerprint
    ledger = SqliteLedger(cfg["ledger"], link="inner")
    link = await InnerLink.connect(
        cfg["host"], cfg["down"], cfg["up"], ledger, fingerprint, log_path=cfg["log"],
        tick_s=cfg["tick_s"], limits=DownlinkLimits(**cfg.get("limits", {})),
        secret=load_secret(cfg["secret"]),
    )
    reason = await serve_frames(link, source)
    print(json.dumps({"end": reason.name}), flush=True)

try:
    asyncio.run(main())
except UplimitError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
    sys.exit(3)
"""


class Outer:
    """The outer side in this process: the real OuterLink, decoding with the tiny weak model."""

    def __init__(self, weak, tmp_path: Path, **options) -> None:
        self.config = FrameConfig(K, weak.info.n_vocab)
        self.fingerprint = codec_fingerprint(weak.info, Calibration(), self.config)
        self.session = weak.session(64, 512)
        self.decoder = FrameDecoder(self.session, weak.info.eos_ids, Calibration(), self.config)
        self.counter = ReceiveCounter(tmp_path / "received.db")
        self.metrics = OuterMetrics()
        self.secret_path = tmp_path / "link.secret"
        if not self.secret_path.exists():
            create_secret(self.secret_path)
        self.tokens: dict[int, list[int]] = {}
        self.link = OuterLink(
            self.fingerprint,
            self.decoder,
            self.counter,
            on_frame=self._frame,
            metrics=self.metrics,
            **{
                "budget_bytes": 100_000,
                "max_frame_bytes": max_frame_bytes(self.config, 64),
                "secret": load_secret(self.secret_path),
                "allowed": frozenset({HOST}),
            }
            | options,
        )

    def _frame(self, content: FrameContent, stats) -> None:
        for s, t in content.tokens.items():
            self.tokens.setdefault(s, []).extend(t)

    def kinds(self) -> list[str]:
        return [a.kind for a in self.link.alarms]

    def close(self) -> None:
        self.session.close()
        self.counter.close()


@pytest.fixture
def outer(tiny_weak, tmp_path):
    o = Outer(tiny_weak, tmp_path)
    yield o
    o.close()


def run(main) -> None:
    """Run `main()` in a fresh loop that records anything raised and never retrieved."""

    async def wrapped():
        errors: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        await main()
        gc.collect()  # tasks that died with an exception report it when collected
        await asyncio.sleep(0)
        assert not errors, f"unhandled errors in the event loop: {errors}"

    asyncio.run(wrapped())


@contextlib.asynccontextmanager
async def inner_process(config: dict, wrap: Callable[[list[str]], list[str]] = lambda a: a):
    """The inner side as a process; killed on the way out if it is still running."""
    argv = wrap([sys.executable, "-c", _INNER, json.dumps(config)])
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def wait_serving(link: OuterLink, proc) -> None:
    """Until the link serves; if the inner exits or stalls first, fail with what it said."""
    serving = asyncio.ensure_future(link.wait_serving(SLOW))
    exited = asyncio.ensure_future(proc.wait())
    await asyncio.wait({serving, exited}, return_when=asyncio.FIRST_COMPLETED)
    exited.cancel()
    if serving.done() and serving.exception() is None:
        return
    serving.cancel()
    if proc.returncode is None:
        proc.kill()
    out, err = await proc.communicate()
    raise AssertionError(
        f"the inner did not start serving (exit {proc.returncode}, link {link.state}):"
        f"\n{out.decode()[-1000:]}\n{err.decode()[-3000:]}"
    )


async def inner_result(proc, timeout: float = SLOW) -> tuple[int, dict]:
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    lines = out.decode().strip().splitlines()
    assert lines, f"inner printed nothing; stderr:\n{err.decode()[-3000:]}"
    return proc.returncode, json.loads(lines[-1])


def inner_config(tmp_path: Path, o: Outer, host: str = HOST, **more) -> dict:
    return {
        "host": host,
        "down": o.link.downlink_port,
        "up": o.link.uplink_port,
        "ledger": str(tmp_path / "ledger.db"),
        "log": str(tmp_path / "downlink.jsonl"),
        "secret": str(o.secret_path),
        "tick_s": TICK,
        "k": K,
        **more,
    }


def spec(weak, i: int, temperature: float, max_tokens: int = 16) -> StreamSpec:
    prompt = weak.chat_tokens([{"role": "user", "content": f"Request {i}: explain {i * 7}."}])
    return StreamSpec(i, tuple(prompt), SamplingParams(temperature), 1000 + i, max_tokens)


def expected_tokens(strong, specs: list[StreamSpec]) -> dict[int, list[int]]:
    """What the inner generates for each stream (each alone, as `_INNER` does)."""
    out = {}
    for s in specs:
        (g,), _ = generate(
            strong, [Request(s.prompt, s.params, s.seed, s.max_tokens)], max_context=512
        )
        out[s.stream_id] = g.tokens
    return out


async def until(condition: Callable[[], bool], timeout: float = SLOW) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def log_types(path: Path) -> list[str]:
    return [json.loads(line)["type"] for line in path.read_text().splitlines()]


# --- the honest path --------------------------------------------------------------------------


def test_a_link_shakes_hands_serves_metrics_and_shuts_down(tmp_path, outer):
    SqliteLedger(tmp_path / "ledger.db", Budgets(100_000)).close()
    http = None

    async def main():
        nonlocal http
        link = outer.link
        await link.start(HOST)
        http = serve_metrics(outer.metrics, HOST, 0)
        config = inner_config(tmp_path, outer, fingerprint=outer.fingerprint)
        async with inner_process(config) as proc:
            await wait_serving(link, proc)
            # Someone else knocking on the downlink port: closed and alarmed, the link unharmed.
            _, stray = await asyncio.open_connection(HOST, link.downlink_port)
            await until(lambda: outer.kinds() == [AlarmKind.CONNECTION], 10)
            assert link.state is LinkState.SERVING
            assert await link.shutdown() is LinkState.CLOSED
            stray.close()
            assert await inner_result(proc) == (0, {"end": "SHUTDOWN"})

    try:
        run(main)
        metrics = urllib.request.urlopen(f"http://{HOST}:{http.server_port}/metrics").read()
    finally:
        if http is not None:
            http.shutdown()
    # Up went the connection charge, the inner's proof, the accept and END(shutdown), each
    # charged first.
    state = SqliteLedger(tmp_path / "ledger.db").usage()
    up = RESPONSE_BYTES + VERDICT + len(encode_uplink(End(EndReason.SHUTDOWN)))
    # The proof is counted apart (read before the inner proved itself), the rest as the link's.
    assert outer.counter.total() + RESPONSE_BYTES == state.wire_bytes == up
    assert unproved(outer.counter).total() == RESPONSE_BYTES
    assert state.timing_bytes >= CONNECT_CHARGE_BYTES
    text = metrics.decode()
    assert f"uplimit_uplink_bytes_total {float(up)}" in text
    assert f"uplimit_budget_left_bytes {100_000.0 - up}" in text
    assert 'uplimit_link_state{uplimit_link_state="closed"} 1.0' in text
    assert 'uplimit_alarms_total{kind="connection"} 1.0' in text
    assert log_types(tmp_path / "downlink.jsonl") == ["challenge", "proof", "hello", "shutdown"]


def test_a_fingerprint_mismatch_is_refused_naming_each_field(tmp_path, outer):
    SqliteLedger(tmp_path / "ledger.db", Budgets(10_000)).close()
    theirs = {**outer.fingerprint, "calibration.sha256": "0" * 64, "numpy.version": "1.26.4"}

    async def main():
        await outer.link.start(HOST)
        async with inner_process(inner_config(tmp_path, outer, fingerprint=theirs)) as proc:
            with pytest.raises(LinkClosed, match="refused to serve"):
                await outer.link.wait_serving(SLOW)
            rc, result = await inner_result(proc)
        assert rc == 3 and result["error"] == "FingerprintMismatch"
        for key in ("calibration.sha256", "numpy.version"):
            both = f"{key}: outer {outer.fingerprint[key]!r}, inner {theirs[key]!r}"
            assert both in result["message"]  # the inner's error
            assert both in outer.link.reason  # the outer's alarm
        await outer.link.aclose()

    run(main)
    assert outer.link.state is LinkState.FAILED and outer.kinds() == [AlarmKind.FINGERPRINT]
    assert not outer.tokens
    # The refusal was charged like any upload, and nothing else went up.
    state = SqliteLedger(tmp_path / "ledger.db").usage()
    assert state.wire_bytes == RESPONSE_BYTES + outer.counter.total() < RESPONSE_BYTES + 100


# --- the link's authentication (link.auth) ----------------------------------------------------


def test_a_foreign_connection_made_first_is_refused_and_the_inner_still_connects(
    tmp_path, tiny_weak
):
    """A process without the secret connects both ports before the inner and answers the
    challenge with 64 bytes of its own: it gets the challenge and nothing else (no HELLO, no
    slot), its uplink is closed with an alarm, and the real inner then takes the link; the
    foreign downlink is closed then."""
    SqliteLedger(tmp_path / "ledger.db", Budgets(100_000)).close()
    outer = Outer(tiny_weak, tmp_path, handshake_timeout_s=SLOW)

    async def main():
        link = outer.link
        await link.start(HOST)
        dr, dw = await asyncio.open_connection(HOST, link.downlink_port)
        assert (await dr.readexactly(CHALLENGE_BYTES)).startswith(CHALLENGE_MAGIC)
        _, uw = await asyncio.open_connection(HOST, link.uplink_port)
        uw.write(bytes(RESPONSE_BYTES))
        await until(lambda: AlarmKind.AUTH in outer.kinds(), 10)
        assert link.state is LinkState.HANDSHAKING
        config = inner_config(tmp_path, outer, fingerprint=outer.fingerprint)
        async with inner_process(config) as proc:
            await wait_serving(link, proc)
            assert await link.shutdown() is LinkState.CLOSED
            assert await inner_result(proc) == (0, {"end": "SHUTDOWN"})
        assert await dr.read() == b""  # the foreign downlink: closed, never a byte more
        dw.close()
        uw.close()

    try:
        run(main)
        assert outer.kinds() == [AlarmKind.AUTH, AlarmKind.CONNECTION]
        assert "failed the challenge (64 of 64 bytes" in outer.link.alarms[0].message
        assert "never proved itself" in outer.link.alarms[1].message
    finally:
        outer.close()


def test_an_inner_with_a_wrong_secret_is_refused_with_an_alarm(tmp_path, tiny_weak):
    SqliteLedger(tmp_path / "ledger.db", Budgets(100_000)).close()
    o = Outer(tiny_weak, tmp_path, handshake_timeout_s=2.0)
    wrong = create_secret(tmp_path / "wrong.secret")

    async def main():
        await o.link.start(HOST)
        config = inner_config(tmp_path, o, fingerprint=o.fingerprint, secret=str(wrong))
        async with inner_process(config) as proc:
            rc, result = await inner_result(proc)
        assert o.link.state is LinkState.HANDSHAKING  # still waiting for its inner
        await o.link.aclose()
        return rc, result

    try:
        rc, result = asyncio.run(main())
        assert rc == 3 and result["error"] == "LinkClosed"
        assert o.kinds() == [AlarmKind.AUTH, AlarmKind.AUTH]  # the uplink, then its downlink
        assert "a wrong secret" in o.link.alarms[0].message
        # The proof, counted before it was refused; nothing else read.
        assert (o.counter.total(), unproved(o.counter).total()) == (0, RESPONSE_BYTES)
    finally:
        o.close()


def test_a_connection_from_an_address_not_configured_is_closed_unread(tmp_path, tiny_weak):
    o = Outer(tiny_weak, tmp_path, allowed=frozenset({"10.255.0.2"}))

    async def main():
        await o.link.start(HOST)
        for port in (o.link.downlink_port, o.link.uplink_port):
            r, w = await asyncio.open_connection(HOST, port)
            w.write(bytes(RESPONSE_BYTES))
            try:
                got = await r.read()
            except ConnectionResetError:  # closed with our bytes unread
                got = b""
            assert got == b""  # not even a challenge
            w.close()
        await o.link.aclose()

    try:
        asyncio.run(main())
        assert o.kinds() == [AlarmKind.CONNECTION] * 2 and o.counter.total() == 0
        assert "not one of the inner's addresses" in o.link.alarms[0].message
    finally:
        o.close()


def test_closing_the_outer_closes_a_downlink_waiting_for_its_proof(outer):
    async def main():
        await outer.link.start(HOST)
        r, w = await asyncio.open_connection(HOST, outer.link.downlink_port)
        await r.readexactly(CHALLENGE_BYTES)
        await outer.link.aclose()
        assert await asyncio.wait_for(r.read(), 5) == b""  # now, not at the handshake timeout
        w.close()

    run(main)
    assert outer.kinds() == []


def test_the_inner_believes_no_outer_without_the_secret(tmp_path, outer):
    """A listener on the outer's ports that does not hold the secret: the inner checks the
    outer's proof before HELLO, alarms and stops; up went only its own proof."""
    SqliteLedger(tmp_path / "ledger.db", Budgets(10_000)).close()

    async def main():
        fake = FakeOuter(outer.fingerprint, bytes(32))
        await fake.start()
        config = inner_config(tmp_path, outer, fingerprint=outer.fingerprint)
        config.update(down=fake.downlink_port, up=fake.uplink_port)
        async with inner_process(config) as proc:
            rc, result = await inner_result(proc)
        fake.close()
        assert rc == 3 and result["error"] == "LinkClosed"
        assert "does not hold the link's secret" in result["message"]
        assert not fake.up  # no verdict: HELLO was never believed

    run(main)
    assert SqliteLedger(tmp_path / "ledger.db").usage().wire_bytes == RESPONSE_BYTES
    assert log_types(tmp_path / "downlink.jsonl") == ["challenge", "refused"]


# --- misbehaving inner sides (raw sockets, no meter) ------------------------------------------


class Coded:
    """Two streams' frames, coded by the real encoder, for a fake inner to send."""

    def __init__(self, strong, weak) -> None:
        self.specs = [spec(weak, 0, 0.0, 12), spec(weak, 1, 1.0, 12)]
        gens = expected_tokens(strong, self.specs)
        self.contents = []
        for start in range(0, max(map(len, gens.values())), K):
            tokens = {s: tuple(g[start : start + K]) for s, g in gens.items()}
            self.contents.append(
                FrameContent(2 if start == 0 else 0, {s: t for s, t in tokens.items() if t})
            )
        config = FrameConfig(K, weak.info.n_vocab)
        self.fingerprint = codec_fingerprint(weak.info, Calibration(), config)
        with weak.session(2, 512) as session:
            enc = FrameEncoder(session, weak.info.eos_ids, Calibration(), config)
            for s in self.specs:
                enc.add_stream(s)
            self.frames = [enc.encode(c)[0] for c in self.contents]
            self.raw_from_1 = enc.resend(1)

    def wire(self, n: int) -> bytes:
        return encode_uplink(Frame(self.frames[n]))

    def tokens(self, frames: int) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for c in self.contents[:frames]:
            for s, t in c.tokens.items():
                out.setdefault(s, []).extend(t)
        return out


@pytest.fixture(scope="module")
def coded(tiny_strong, tiny_weak) -> Coded:
    return Coded(tiny_strong, tiny_weak)


class FakeInner:
    """An inner side that writes whatever a test wants: raw sockets, no ledger."""

    async def connect(self, link: OuterLink, secret: bytes) -> None:
        """Both connections, the challenge answered with `secret` (which a compromised inner
        host holds), HELLO read."""
        self.dr, self.dw = await asyncio.open_connection(HOST, link.downlink_port)
        self.parser, self.down = DownlinkParser(), []
        nonce_o = (await self.dr.readexactly(CHALLENGE_BYTES))[len(CHALLENGE_MAGIC) :]
        self.ur, self.uw = await asyncio.open_connection(HOST, link.uplink_port)
        nonce_i = new_nonce()
        await self.send(nonce_i + inner_proof(secret, nonce_o, nonce_i))
        await self.dr.readexactly(PROOF_BYTES)
        await self.read_down(1)  # HELLO

    async def read_down(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.down) < count:
                self.down += self.parser.feed(await self.dr.read(1 << 16))

    async def send(self, data: bytes) -> None:
        self.uw.write(data)
        await self.uw.drain()

    def close(self) -> None:
        self.uw.close()
        self.dw.close()


async def serving_fake(outer: Outer, coded: Coded) -> FakeInner:
    fake = FakeInner()
    await outer.link.start(HOST)
    await fake.connect(outer.link, load_secret(outer.secret_path))
    await fake.send(encode_uplink(Accept(fingerprint_digest(coded.fingerprint))))
    # What an honest ledger has charged by now: the proof and the accept.
    await fake.send(encode_uplink(LedgerReport(bytes(16), RESPONSE_BYTES + 5, False)))
    await outer.link.wait_serving(10)
    for s in coded.specs:
        await outer.link.open_stream(s)
    await fake.read_down(3)
    return fake


@pytest.mark.parametrize("damage", ["replay", "reorder", "truncate"])
def test_replayed_reordered_or_truncated_frames_are_rejected_then_recovered(outer, coded, damage):
    bad = {
        "replay": coded.frames[0],
        "reorder": coded.frames[2],
        "truncate": coded.frames[1][:-1],
    }[damage]

    async def main():
        fake = await serving_fake(outer, coded)
        await fake.send(coded.wire(0) + encode_uplink(Frame(bad)))
        await fake.read_down(4)
        assert fake.down[-1] == Resend(1)  # the outer asked for a resend
        assert outer.tokens == coded.tokens(1)  # nothing from the bad frame
        assert outer.kinds() == [AlarmKind.MISMATCH]
        await fake.send(coded.wire(1))  # in flight before the RESEND: skipped quietly
        await fake.send(RESYNC)  # what the outer skips to: the raw resends follow it
        for raw in coded.raw_from_1:
            await fake.send(encode_uplink(Frame(raw)))
        await until(lambda: outer.decoder.frame_no == len(coded.frames), 10)
        assert outer.link.state is LinkState.SERVING
        assert outer.tokens == coded.tokens(len(coded.frames))
        fake.close()
        await outer.link.wait_final(10)
        await outer.link.aclose()

    run(main)
    assert outer.kinds() == [AlarmKind.MISMATCH, AlarmKind.CLOSED]  # then: closed without END
    rejected = {"outcome": "rejected"}
    assert outer.metrics.registry.get_sample_value("uplimit_frames_total", rejected) == 1


BAD_UPLINKS = {
    "unknown END reason": (RESYNC + encode_end(0), AlarmKind.PROTOCOL, "unknown END reason 0"),
    "END without its marker": (encode_end(4), AlarmKind.PROTOCOL, "without its RESYNC marker"),
    "bytes after END": (RESYNC + encode_end(4) + b"\x01", AlarmKind.PROTOCOL, "after END"),
    "truncated frame at close": (b"\x40abc", AlarmKind.PROTOCOL, "truncated uplink"),
    "closed without END": (b"", AlarmKind.CLOSED, "without END"),
}


@pytest.mark.parametrize("case", list(BAD_UPLINKS))
def test_malformed_uplink_input_fails_the_link_and_delivers_nothing_of_it(outer, coded, case):
    data, kind, message = BAD_UPLINKS[case]

    async def main():
        fake = await serving_fake(outer, coded)
        await fake.send(coded.wire(0))
        await until(lambda: outer.decoder.frame_no == 1, 10)
        await fake.send(data)
        fake.close()
        await outer.link.wait_final(10)
        await outer.link.aclose()

    run(main)
    assert outer.link.state is LinkState.FAILED
    assert outer.kinds() == [kind] and message in outer.link.reason
    assert outer.tokens == coded.tokens(1)  # frame 0, nothing of what followed


def test_a_verdict_that_is_not_protocol_1_fails_the_link(outer):
    async def main():
        fake = FakeInner()
        await outer.link.start(HOST)
        await fake.connect(outer.link, load_secret(outer.secret_path))
        await fake.send(b"\x7fGET / HTTP/1.1")
        await outer.link.wait_final(10)
        fake.close()
        await outer.link.aclose()

    run(main)
    assert outer.kinds() == [AlarmKind.PROTOCOL] and "verdict byte 0x7f" in outer.link.reason


def test_bytes_from_the_inner_on_the_downlink_fail_the_link_and_are_counted(outer, coded):
    async def main():
        fake = await serving_fake(outer, coded)
        await fake.send(coded.wire(0))
        await until(lambda: outer.decoder.frame_no == 1, 10)
        fake.dw.write(b"leak")  # an upload around the meter
        await fake.dw.drain()
        await outer.link.wait_final(10)
        fake.close()
        await outer.link.aclose()

    run(main)
    assert outer.kinds() == [AlarmKind.DOWNLINK_UPLOAD] and "bypassing" in outer.link.reason
    # The receive counter has the byte the outer read (one proves it, and it reads no more):
    # `uplimit meters` shows more received than charged.
    assert outer.counter.total() == VERDICT + len(coded.wire(0)) + 1


def test_bytes_up_to_the_frame_cap_are_judged_without_waiting_for_more(outer, coded):
    """The cap is the frame bound of the outer's coding config, not the protocol's 1 MiB: with
    that many bytes and the decoder's 8 of lookahead in hand, what they begin with is judged
    as it is. Zeros are no frame: a mismatch, and a RESEND; the link goes on."""
    bound = max_frame_bytes(outer.config, 64)

    async def main():
        fake = await serving_fake(outer, coded)
        await fake.send(bytes(bound + 8))
        await until(lambda: AlarmKind.MISMATCH in outer.kinds(), 10)
        assert outer.link.state is LinkState.SERVING
        await fake.read_down(4)
        assert fake.down[-1] == Resend(0)
        fake.close()
        await outer.link.wait_final(10)
        await outer.link.aclose()

    assert 1000 < bound < 10_000
    run(main)


def test_an_inner_that_floods_past_its_ledger_meets_the_outers_own_budget(tmp_path, tiny_weak):
    """A process that skips the ledger (`redteam.flood`) writes 64 kB of frames the decoder
    rejects: the outer counts them against its own budget, reads not one byte past it, fails
    the link with an alarm, and its metric shows nothing left."""
    budget = 6_000
    o = Outer(tiny_weak, tmp_path, budget_bytes=budget)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(random.Random(3).randbytes(64_000))

    async def main():
        await o.link.start(HOST)
        argv = [
            sys.executable, "-m", "uplimit.redteam.flood", HOST, str(o.link.downlink_port),
            str(o.link.uplink_port), str(o.secret_path), fingerprint_digest(o.fingerprint).hex(),
            str(secret), "300",
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), SLOW)
        assert await o.link.wait_final(10) is LinkState.FAILED
        await o.link.aclose()
        return int(out.split()[1])

    try:
        sent = asyncio.run(main())
        # It wrote more; the outer read up to the budget (less the byte that the watch on the
        # downlink keeps), never past it.
        assert o.counter.total() + unproved(o.counter).total() == budget - 1 < sent
        assert AlarmKind.RECEIVE_BUDGET in o.kinds()
        assert o.link.reason.startswith("the outer's receive budget of 6,000 bytes is spent")
        assert o.metrics.registry.get_sample_value("uplimit_budget_left_bytes") == 1
        kind = {"kind": "receive-budget"}
        assert o.metrics.registry.get_sample_value("uplimit_alarms_total", kind) == 1
    finally:
        o.close()


def test_an_outer_whose_budget_is_spent_takes_no_inner(tmp_path, tiny_weak):
    """The count is durable: an outer restarted on a spent budget fails at once, alarms, and
    reads nothing from whoever connects."""
    first = Outer(tiny_weak, tmp_path, budget_bytes=10)
    first.counter.add(10)
    first.close()
    o = Outer(tiny_weak, tmp_path, budget_bytes=10)

    async def main():
        await o.link.start(HOST)
        assert o.link.state is LinkState.FAILED
        with contextlib.suppress(OSError):
            _, w = await asyncio.open_connection(HOST, o.link.downlink_port)
            w.write(b"x" * 100)
            w.close()
        await asyncio.sleep(0.2)
        await o.link.aclose()

    try:
        asyncio.run(main())
        assert o.counter.total() == 10 and o.kinds() == [AlarmKind.RECEIVE_BUDGET]
    finally:
        o.close()


@pytest.mark.parametrize("then", ["END", "nothing"])
def test_a_lost_downlink_leaves_the_verdict_to_the_uplink(tiny_weak, tmp_path, coded, then):
    """An inner that ends closes its downlink after sending END. The outer may try to write
    down in between (a new stream): that must not turn `exhausted` into `failed`. An inner
    that closes its downlink and leaves its uplink open without END has failed."""
    o = Outer(tiny_weak, tmp_path, downlink_grace_s=0.5)

    async def main():
        fake = await serving_fake(o, coded)
        fake.dw.close()
        with pytest.raises(LinkClosed):
            for i in range(500):  # new streams, until the outer sees the downlink gone
                await o.link.open_stream(spec(tiny_weak, 50 + i, 0.0))
                await asyncio.sleep(0.02)
        if then == "END":
            await fake.send(encode_uplink(End(EndReason.LIFETIME)))
        assert await o.link.wait_final(10) is (
            LinkState.EXHAUSTED if then == "END" else LinkState.FAILED
        )
        fake.close()
        await o.link.aclose()

    try:
        run(main)
    finally:
        o.close()
    if then == "END":
        assert o.kinds() == [] and "lifetime" in o.link.reason
    else:
        assert o.kinds() == [AlarmKind.CLOSED] and "did not end" in o.link.reason


# --- the downlink's limits, enforced by a real inner ------------------------------------------


class FakeOuter:
    """An outer side that sends whatever a test wants down, and records what comes up."""

    def __init__(self, fingerprint: dict[str, str], secret: bytes) -> None:
        self.fingerprint, self.secret = fingerprint, secret
        self.nonce = new_nonce()
        self.up = bytearray()  # after the inner's proof
        self.down_writer: asyncio.StreamWriter | None = None
        self.up_closed = asyncio.Event()

    async def start(self) -> None:
        self.servers = [
            await asyncio.start_server(self._down, HOST, 0),
            await asyncio.start_server(self._up, HOST, 0),
        ]
        self.downlink_port, self.uplink_port = (s.sockets[0].getsockname()[1] for s in self.servers)

    async def _down(self, reader, writer) -> None:
        self.down_writer = writer
        writer.write(CHALLENGE_MAGIC + self.nonce)
        await writer.drain()

    async def _up(self, reader, writer) -> None:
        nonce_i = (await reader.readexactly(RESPONSE_BYTES))[:NONCE_BYTES]
        assert self.down_writer is not None
        self.down_writer.write(
            outer_proof(self.secret, self.nonce, nonce_i)
            + DOWNLINK_PREAMBLE
            + encode_downlink(Hello.of(self.fingerprint))
        )
        while data := await reader.read(1 << 16):
            self.up += data
        self.up_closed.set()

    def close(self) -> None:
        for s in self.servers:
            s.close()


@pytest.mark.parametrize("flood", ["one oversized message", "too fast"])
def test_the_inner_enforces_the_downlink_limits(tmp_path, outer, flood):
    SqliteLedger(tmp_path / "ledger.db", Budgets(10_000)).close()
    limits = {"max_message_bytes": 1024, "bytes_per_s": 4000.0, "burst_bytes": 8192}
    result = {}

    async def main():
        fake = FakeOuter(outer.fingerprint, load_secret(outer.secret_path))
        await fake.start()
        config = inner_config(tmp_path, outer, fingerprint=outer.fingerprint, limits=limits)
        config.update(down=fake.downlink_port, up=fake.uplink_port)
        async with inner_process(config) as proc:
            await until(lambda: len(fake.up) >= VERDICT)  # the accept and the ledger report
            if flood == "one oversized message":
                header = encode_downlink(Cancel(1))[:1] + (5000).to_bytes(4, "big")
                fake.down_writer.write(header)
            else:  # valid messages, 40 kB at once: 5x the burst, far above the rate
                fake.down_writer.write(encode_downlink(Cancel(1)) * 6000)
            await fake.down_writer.drain()
            await asyncio.wait_for(fake.up_closed.wait(), SLOW)
            result["inner"] = await inner_result(proc)
        fake.close()
        result["up"] = bytes(fake.up)

    run(main)
    rc, out = result["inner"]
    assert rc == 3 and out["error"] == "ProtocolError"
    expected = "5,000 bytes; the limit is 1,024" if flood != "too fast" else "faster than 4,000"
    assert expected in out["message"]
    # Up went the proof, the accept, the ledger report and END(error), nothing else; all of it
    # charged.
    assert result["up"][VERDICT:] == encode_uplink(End(EndReason.ERROR))
    end = len(encode_uplink(End(EndReason.ERROR)))
    assert SqliteLedger(tmp_path / "ledger.db").usage().wire_bytes == RESPONSE_BYTES + VERDICT + end
    assert log_types(tmp_path / "downlink.jsonl")[:3] == ["challenge", "proof", "hello"]
    assert log_types(tmp_path / "downlink.jsonl")[-1] == "violation"


# --- budget exhaustion over the real transport ------------------------------------------------

BUDGET = 1200
STREAMS = 5  # kept open at once while spending the budget: frames carry several streams


def random_answer(s: StreamSpec, n_vocab: int, eos: frozenset[int]) -> list[int]:
    """What `_INNER` answers a stream opened with {"answer": "random"}."""
    allowed = [t for t in range(n_vocab) if t not in eos]
    return random.Random(s.seed).choices(allowed, k=s.max_tokens)


def _meters(tmp_path, kernel: str | None = None) -> tuple[int, dict]:
    argv = [
        str(Path(sys.executable).with_name("uplimit")), "meters", "--json",
        "--ledger", str(tmp_path / "ledger.db"), "--received", str(tmp_path / "received.db"),
    ]  # fmt: skip
    if kernel:
        argv += ["--kernel", kernel]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize("where", ["loopback", "kernel namespace"])
def test_streams_round_trip_then_the_budget_runs_out(
    request, tmp_path, outer, tiny_pair_dirs, tiny_strong, tiny_weak, where
):
    """The whole link: streams decoded exactly, then concurrent streams until the lifetime
    budget refuses. No meter (ledger, outer count, kernel) ever passes the budget by a byte,
    and `uplimit meters` finds them in agreement."""
    host, wrap, km = HOST, (lambda a: a), None
    if where == "kernel namespace":
        # The quota must not be what stops the link: room for headers and downlink ACKs.
        km = request.getfixturevalue("kernel_meter")(20 * BUDGET)
        host, wrap = km.outer_address, km.command
        outer.link.allowed = frozenset({km.inner_address})
    SqliteLedger(tmp_path / "ledger.db", Budgets(BUDGET)).close()
    exact = [spec(tiny_weak, i, t) for i, t in enumerate([0.0, 0.7, 1.0])]
    spending: list[StreamSpec] = []
    rng = random.Random(5)
    result = {}

    async def spend_the_budget():
        random_stream = json.dumps({"answer": "random"}).encode()
        while outer.link.state is LinkState.SERVING:
            table = outer.decoder.table
            if len(table.active) + len(table.pending) >= STREAMS:
                await asyncio.sleep(0.01)
                continue
            s = spec(tiny_weak, len(exact) + len(spending), 1.0, rng.randint(8, 24))
            try:
                await outer.link.open_stream(s, random_stream)
            except LinkClosed:
                return
            spending.append(s)

    async def main():
        await outer.link.start(host)
        config = inner_config(tmp_path, outer, host, pair=list(map(str, tiny_pair_dirs)))
        async with inner_process(config, wrap) as proc:
            await wait_serving(outer.link, proc)
            for s in exact:
                await outer.link.open_stream(s)
            await until(lambda: outer.decoder.frame_no > 0 and not outer.decoder.table.active)
            result["exact"] = {s.stream_id: outer.tokens.get(s.stream_id) for s in exact}
            spender = asyncio.create_task(spend_the_budget())
            assert await outer.link.wait_final(SLOW) is LinkState.EXHAUSTED
            await spender
            result["inner"] = await inner_result(proc)
        await outer.link.aclose()

    run(main)
    assert result["exact"] == expected_tokens(tiny_strong, exact)
    assert result["inner"] == (0, {"end": "LIFETIME"})
    assert "lifetime" in outer.link.reason and outer.kinds() == []
    # Everything delivered is what the inner said (a prefix where the budget cut in).
    info = tiny_weak.info
    for s in spending:
        got = outer.tokens.get(s.stream_id, [])
        assert got == random_answer(s, info.n_vocab, info.eos_ids)[: len(got)]
    state = SqliteLedger(tmp_path / "ledger.db").usage()
    received = outer.counter.total()  # after the inner proved itself; its proof apart
    assert state.usage.lifetime_bytes <= BUDGET  # the ledger, timing included
    assert received + RESPONSE_BYTES <= BUDGET  # the outer
    # Every charged byte was written, and arrived.
    assert state.wire_bytes == received + unproved(outer.counter).total()
    assert BUDGET - state.usage.lifetime_bytes < END_RESERVE_BYTES + 128  # nearly all spent
    # The downlink is logged inside, message by message, service fields included.
    log = [json.loads(line) for line in (tmp_path / "downlink.jsonl").read_text().splitlines()]
    opens = [e for e in log if e["type"] == "open_stream"]
    # The last OPEN_STREAM may cross the inner's END on the wire and never be read.
    sent = [s.stream_id for s in exact + spending]
    assert [e["type"] for e in log[:3]] == ["challenge", "proof", "hello"]
    assert [e["stream_id"] for e in opens] == sent[: len(opens)]
    assert len(opens) >= len(sent) - 1
    assert opens[0]["prompt"] == list(exact[0].prompt) and opens[0]["extra"] == ""
    assert opens[-1]["extra"] == '{"answer": "random"}'
    report = f"\n{where}: budget {BUDGET:,}, ledger {state.usage.lifetime_bytes:,} (wire"
    report += f" {state.wire_bytes:,}), received {received:,}, {len(spending)} streams spending"
    rc, meters = _meters(tmp_path, km.name if km else None)
    assert rc == 0 and meters["agree"], meters
    if km is not None:
        reading = km.read()
        assert not reading.over_quota
        # The kernel saw every payload byte (more only if TCP retransmitted), never over budget.
        assert received <= reading.tcp_payload_bytes <= BUDGET
        assert reading.ctl_packets > 0  # the inner's ACKs for the downlink, counted apart
        assert meters["kernel"]["ctl_bytes"] == reading.ctl_bytes
        report += (
            f", kernel payload {reading.tcp_payload_bytes:,} in {reading.sent_bytes:,} IP bytes"
            f" ({reading.ctl_packets} payload-free packets, {reading.ctl_bytes:,} B)"
        )
    print(report)


# --- the outer paces the downlink to the inner's limits (#16 item 3) -------------------------


def test_the_outer_paces_the_downlink_so_the_inner_never_ends_the_link(tmp_path, tiny_weak):
    """Cancels sent as fast as a caller can, 3x the inner's burst: the outer's bucket holds
    them back to the inner's rate, and the inner serves on (without the pacing it ends the
    link: 'downlink faster than')."""
    SqliteLedger(tmp_path / "ledger.db", Budgets(100_000)).close()
    limits = {"max_message_bytes": 1024, "bytes_per_s": 8000.0, "burst_bytes": 8192}
    paced = Outer(tiny_weak, tmp_path, downlink_limits=DownlinkLimits(**limits))
    cancels = 3 * limits["burst_bytes"] // len(encode_downlink(Cancel(1)))

    async def main():
        link = paced.link
        await link.start(HOST)
        config = inner_config(tmp_path, paced, fingerprint=paced.fingerprint, limits=limits)
        async with inner_process(config) as proc:
            await wait_serving(link, proc)
            start = time.monotonic()
            await asyncio.gather(*(link.cancel(1) for _ in range(cancels)))
            took = time.monotonic() - start
            await asyncio.sleep(1.0)  # what the inner read last has been checked
            assert link.state is LinkState.SERVING, link.reason
            assert proc.returncode is None
            # At 9/10 of the rate after half the burst: what was sent took its time.
            sent = cancels * len(encode_downlink(Cancel(1)))
            assert took >= (sent - limits["burst_bytes"] // 2) / limits["bytes_per_s"]
            assert await link.shutdown() is LinkState.CLOSED

    try:
        run(main)
    finally:
        paced.close()
