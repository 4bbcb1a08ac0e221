"""A live weak-model rollout, over the real transport, on the tiny pair (llama.cpp, GGUF).

The outer sends the new model down and both sides switch; streams that were running finish on
the old model, new ones use the new one, every frame decodes at the first try, and a side
restarted without the other's record is refused at the handshake.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from support.config import init_ledger_for, link_files, write_config
from support.net import free_port
from support.waiting import eventually, stop_task, wait_healthy
from uplimit.coding.calibration import Calibration
from uplimit.coding.sampling import SamplingParams
from uplimit.errors import FingerprintMismatch, ProtocolError
from uplimit.inner.audit import AuditStore
from uplimit.inner.serve import scheduler_config, serve_inner
from uplimit.inner.service import InnerService
from uplimit.link.rollout import WeakRollout
from uplimit.models.active import ActiveWeak, with_active_weak
from uplimit.models.llama import LlamaModel
from uplimit.models.tiny import export_gguf
from uplimit.outer.serve import serve_outer
from uplimit.wire.fingerprint import codec_fingerprint, fingerprint_sha256
from uplimit.wire.protocol import ModelOffer
from uplimit.wire.streams import StreamSpec

ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def ggufs(tiny_pair_dirs, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(strong, weak, new weak): the new weak model is a copy of the strong one, which shares
    the tokenizer and makes every guess hit."""
    strong, weak = (export_gguf(d) for d in tiny_pair_dirs)
    new = tmp_path_factory.mktemp("rollout") / "new-weak.gguf"
    shutil.copyfile(strong, new)
    return strong, weak, new


def _config(tmp_path: Path, strong: Path, weak: Path):
    config = write_config(tmp_path / "uplimit.toml", {
        "models": {"strong": strong, "weak": weak, "threads": 1},
        "coding": {"frame_tokens": 2, "max_streams": 8, "max_context": 512},
        "link": {"downlink_port": free_port(), "uplink_port": free_port(), "tick_s": 0.05,
                 "max_latency_s": 0.0, "lifetime_budget_bytes": 10000000,
                 "downlink_bytes_per_s": 40000000, **link_files(tmp_path)},
        "inner": {"max_batch": 4, "audit": tmp_path / "audit.db",
                  "received_models": tmp_path / "received",
                  "rollout_record": tmp_path / "inner.json"},
        "outer": {"port": free_port(), "metrics_port": free_port(), "model_name": "tiny",
                  "admin_key": ADMIN, "rollout_record": tmp_path / "outer.json"},
    })  # fmt: skip
    init_ledger_for(config)
    return config


def _load(path: Path) -> LlamaModel:
    return LlamaModel(path, n_threads=1)


def test_a_live_rollout_switches_both_sides_between_streams(ggufs, tmp_path):
    strong_path, weak_path, new_path = ggufs
    config = _config(tmp_path, strong_path, weak_path)
    calibration = tmp_path / "calibration.json"
    calibration.write_text(Calibration().to_json())
    url = f"http://127.0.0.1:{config.outer.port}"
    strong, inner_weak, outer_weak = _load(strong_path), _load(weak_path), _load(weak_path)

    async def read(stream) -> tuple[str, float]:
        text = ""
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
        return text, time.time()

    async def main():
        outer = asyncio.create_task(serve_outer(config, outer_weak))
        inner = asyncio.create_task(serve_inner(config, strong, inner_weak))
        await wait_healthy(url)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        chat = [{"role": "user", "content": "Write a long story."}]
        running = [
            await client.chat.completions.create(
                model="tiny", messages=chat, max_tokens=200, temperature=0.7, seed=s, stream=True
            )
            for s in range(4)
        ]
        readers = [asyncio.create_task(read(s)) for s in running]
        admin = {"authorization": f"Bearer {ADMIN}"}
        body = {"weak": str(new_path), "calibration": str(calibration)}
        async with httpx.AsyncClient(base_url=url) as http:
            denied = await http.post("/admin/rollout", json=body)
            started = await http.post("/admin/rollout", json=body, headers=admin)
            busy = await http.post("/admin/rollout", json=body, headers=admin)

            async def done() -> bool:
                nonlocal status
                status = (await http.get("/admin/rollout", headers=admin)).json()
                return status["state"] not in ("checking", "sending")

            status = None
            await eventually(done, "the rollout to finish", timeout_s=120)
        after = await client.chat.completions.create(
            model="tiny", messages=chat, max_tokens=40, temperature=0.7, seed=9
        )
        finished = await asyncio.gather(*readers)
        await client.close()
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://127.0.0.1:{config.outer.metrics_port}/metrics")).text
        await stop_task(outer)
        await asyncio.wait_for(inner, 30)
        return denied, started, busy, status, finished, after, metrics

    try:
        denied, started, busy, status, finished, after, metrics = asyncio.run(main())
        # Every answer is what the inner generated (its audit store says what it uploaded).
        audit = AuditStore(config.inner.audit)
        records = sorted(audit.query(last=10), key=lambda r: r.seed)
        audit.close()
        uploaded = [
            strong.detokenize([t for t in r.uploaded if t not in strong.info.eos_ids])
            for r in records
        ]
    finally:
        for m in (strong, inner_weak, outer_weak):
            m.close()
    assert uploaded == [text for text, _ in finished] + [after.choices[0].message.content]

    assert denied.status_code == 401
    assert started.status_code == 202 and busy.status_code == 409
    assert status["state"] == "switched", status
    sha = hashlib.sha256(new_path.read_bytes()).hexdigest()
    assert status["sha256"] == sha and status["sent_bytes"] == new_path.stat().st_size
    # Some stream was still running at the switch, and finished (on the old model).
    assert any(at > status["switched"] for _, at in finished)
    # Every frame decoded at the first try: the sides agreed on each stream's model throughout.
    rejected = re.search(r'^uplimit_frames_total\{outcome="rejected"\} (\S+)$', metrics, re.M)
    assert rejected is None or float(rejected.group(1)) == 0
    # Both sides recorded the switch; the inner holds the file it was sent.
    inner_record = ActiveWeak.load(Path(config.inner.rollout_record))
    outer_record = ActiveWeak.load(Path(config.outer.rollout_record))
    assert inner_record.sha256 == outer_record.sha256 == sha
    assert Path(inner_record.weak).read_bytes() == new_path.read_bytes()
    log = [json.loads(line) for line in Path(config.link.downlink_log).read_text().splitlines()]
    kinds = [e["type"] for e in log]
    assert kinds.count("model_offer") == kinds.count("switch") == 1
    assert kinds.index("model_offer") < kinds.index("switch")
    assert sum(e["length"] for e in log if e["type"] == "model_data") == new_path.stat().st_size

    # A restarted inner without its record (the old weak model) is refused by the outer,
    # which serves the new one: the handshake names the weak model's hash.
    Path(config.inner.rollout_record).unlink()
    outer_config = with_active_weak(config, "outer")
    assert outer_config.models.weak == str(new_path)

    async def restart():
        weak_new, strong2, weak_old = _load(new_path), _load(strong_path), _load(weak_path)
        outer = asyncio.create_task(serve_outer(outer_config, weak_new))
        try:
            await wait_healthy(url, serving=False)
            with pytest.raises(FingerprintMismatch) as refused:
                await serve_inner(config, strong2, weak_old, connect_timeout_s=30)
            return refused.value
        finally:
            await stop_task(outer)
            for m in (weak_new, strong2, weak_old):
                m.close()

    refusal = asyncio.run(restart())
    assert [d.key for d in refusal.differences] == ["weak.sha256"]


def test_the_inner_refuses_a_file_or_fingerprint_other_than_offered(ggufs, tmp_path):
    strong_path, weak_path, new_path = ggufs
    config = _config(tmp_path, strong_path, weak_path)
    strong, weak = _load(strong_path), _load(weak_path)
    service = InnerService(strong, weak, Calibration(), scheduler_config(config))
    received, record = tmp_path / "received", tmp_path / "inner.json"
    rollout = WeakRollout(
        strong, service.frame_config, service.switch_weak, received, record, _load
    )
    data = new_path.read_bytes()
    try:
        # The bytes that came are not the offered file: nothing is kept.
        rollout.offer(ModelOffer(bytes(32), len(data), Calibration().to_json().encode()))
        with pytest.raises(ProtocolError, match="arrived with sha256"):
            rollout.data(data)
        assert list(received.iterdir()) == []

        # The right file, but SWITCH names another fingerprint: no switch, no record.
        sha = hashlib.sha256(data).digest()
        rollout.offer(ModelOffer(sha, len(data), Calibration().to_json().encode()))
        rollout.data(data[:1000])
        rollout.data(data[1000:])
        assert (received / f"weak-{sha.hex()[:16]}.gguf").read_bytes() == data
        with pytest.raises(FingerprintMismatch):
            rollout.switch(bytes(32))
        assert service.encoder.generations == 1 and not record.exists()

        # And the right one switches; a stream opened before keeps the old model.
        service.open_stream(StreamSpec(0, (1, 2, 3), SamplingParams(), 1, 4))
        rollout.offer(ModelOffer(sha, len(data), Calibration().to_json().encode()))
        rollout.data(data)
        new = _load(new_path)
        expected = codec_fingerprint(new.info, Calibration(), service.frame_config)
        new.close()
        rollout.switch(fingerprint_sha256(expected))
        assert service.encoder.generations == 2
        assert ActiveWeak.load(record).sha256 == sha.hex()
    finally:
        rollout.close()
        service.close()
        strong.close()
        weak.close()


def test_a_calibration_that_does_not_parse_is_refused_at_the_offer(ggufs, tmp_path):
    strong_path, weak_path, _ = ggufs
    config = _config(tmp_path, strong_path, weak_path)
    strong, weak = _load(strong_path), _load(weak_path)
    service = InnerService(strong, weak, Calibration(), scheduler_config(config))
    rollout = WeakRollout(
        strong,
        service.frame_config,
        service.switch_weak,
        tmp_path / "r",
        tmp_path / "i.json",
        _load,
    )
    try:
        with pytest.raises(ProtocolError, match="calibration does not parse"):
            rollout.offer(ModelOffer(bytes(32), 10, b"{not json"))
    finally:
        service.close()
        strong.close()
        weak.close()
