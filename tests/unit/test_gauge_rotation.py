"""Gauge rotation on the inner side, end to end on the tiny model with llama.cpp: the next copy
is prepared ahead, swapped in between generations, and every generation's audit record names
the gauge that generated it; restarts resume the recorded copy; failures surface."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from uplimit.coding.calibration import Calibration
from uplimit.coding.sampling import SamplingParams
from uplimit.config import load_config
from uplimit.errors import BackendError, ConfigError
from uplimit.gauge.schedule import GaugeAudit, GaugeSchedule
from uplimit.inner.audit import AuditStore
from uplimit.inner.rotation import GaugeRotation
from uplimit.inner.scheduler import SchedulerConfig
from uplimit.inner.serve import rotation_for
from uplimit.inner.service import InnerService
from uplimit.models.base import LanguageModel
from uplimit.models.llama import LlamaModel
from uplimit.models.store import sha256_file
from uplimit.models.tiny import export_gguf
from uplimit.wire.streams import StreamSpec

SECRET = b"s" * 32
PERIOD = 100.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def load(path: Path) -> LanguageModel:
    return LlamaModel(path, n_threads=1)


@pytest.fixture
def source(tiny_pair_dirs: tuple[Path, Path]) -> Path:
    return export_gguf(tiny_pair_dirs[0])


def rotation(tmp_path: Path, source: Path, clock: Clock, **kw: object) -> GaugeRotation:
    schedule = GaugeSchedule(SECRET, PERIOD)
    audit = GaugeAudit(tmp_path / "gauge-audit.jsonl")
    return GaugeRotation(schedule, audit, tmp_path / "copies", source, kw.pop("load", load),
                         lead_s=10.0, clock=clock, **kw)  # fmt: skip


def wait_prepared(rot: GaugeRotation) -> None:
    deadline = time.monotonic() + 60
    while not rot.prepared:
        assert time.monotonic() < deadline, "the next copy was not prepared"
        time.sleep(0.02)


def spec(model: LanguageModel, i: int, max_tokens: int) -> StreamSpec:
    prompt = tuple(model.chat_tokens([{"role": "user", "content": f"Hello {i}!"}]))
    return StreamSpec(i, prompt, SamplingParams(temperature=0.7), 1000 + i, max_tokens)


def test_rotation_swaps_between_generations_and_audits_each(
    tmp_path: Path, source: Path, tiny_pair_dirs: tuple[Path, Path]
) -> None:
    clock = Clock(5.0)
    rot = rotation(tmp_path, source, clock)
    first = rot.start()
    (rec0,) = rot.audit.records()
    assert (rec0.epoch, rec0.gauge_id, rec0.started_at) == (0, first.gauge_id, 5.0)
    assert rec0.applied_to == sha256_file(source) and rec0.weights_sha256 == sha256_file(first.path)

    weak = LlamaModel(export_gguf(tiny_pair_dirs[1]), n_threads=1)
    audit = AuditStore(tmp_path / "audit.db")
    config = SchedulerConfig(max_batch=4, max_streams=4, max_context=256, frame_tokens=4)
    service = InnerService(first.model, weak, Calibration(), config, audit=audit, rotation=rot)
    try:
        clock.now = 80.0  # more than lead_s before epoch 1: nothing is prepared yet
        service.step()
        assert not rot.prepared and sorted(p.name for p in rot.directory.iterdir()) == [
            first.path.name
        ]
        clock.now = 95.0  # within lead_s: epoch 1's copy is written in the background
        service.step()
        wait_prepared(rot)
        assert service.step() is False and service.scheduler.gauge_id == first.gauge_id  # not due

        service.open_stream(spec(first.model, 0, max_tokens=40))
        service.step()  # stream 0 starts on epoch 0's copy
        clock.now = 100.0  # epoch 1 is due; stream 0 is still running
        service.open_stream(spec(first.model, 1, max_tokens=8))
        service.step()  # due: stream 1 is held back while stream 0 finishes on the old copy
        assert service.scheduler.hold_starts and service.scheduler.busy
        assert service.scheduler.gauge_id == first.gauge_id
        for _ in range(500):
            service.step()
            if service.scheduler.idle or all(
                len(audit.query(request_id=f"stream-{k}")) for k in (0, 1)
            ):
                break
        recs = {r.stream_id: r for r in audit.query(last=10)}
        second = rot.current
        assert second.epoch == 1 and second.gauge_id != first.gauge_id
        # stream 0 finished on the copy it started on; stream 1 waited for the new one
        assert recs[0].gauge_id == first.gauge_id and recs[1].gauge_id == second.gauge_id
        rec1 = rot.audit.latest()
        assert (rec1.epoch, rec1.gauge_id, rec1.started_at) == (1, second.gauge_id, 100.0)
        assert rec1.applied_to == rec0.weights_sha256  # composed on the previous copy
        assert not first.path.exists() and second.path.is_file()
    finally:
        service.close()
        rot.close()
        audit.close()
        weak.close()


def test_restart_resumes_the_recorded_copy_and_cleans_up(tmp_path: Path, source: Path) -> None:
    clock = Clock(5.0)
    rot = rotation(tmp_path, source, clock)
    first = rot.start()
    rot.close()
    stray = rot.directory / f".staging-1-{'0' * 32}.gguf"
    stray.write_bytes(b"partial")
    keep = rot.directory / "notes.gguf"
    keep.write_bytes(b"not ours")

    again = rotation(tmp_path, source, clock)
    assert again.start().sha256 == first.sha256 and len(again.audit.records()) == 1
    assert not stray.exists() and keep.exists()
    again.close()

    with first.path.open("ab") as f:  # the recorded copy changed: it is not served
        f.write(b"x")
    clock.now = 250.0
    third = rotation(tmp_path, source, clock)
    made = third.start()
    assert made.epoch == 2 and made.applied_to == sha256_file(source)
    assert [r.epoch for r in third.audit.records()] == [0, 2]
    third.close()


def test_a_failed_preparation_surfaces(tmp_path: Path, source: Path) -> None:
    calls = []

    def flaky(path: Path) -> LanguageModel:
        calls.append(path)
        if len(calls) > 1:
            raise BackendError("cannot load")
        return load(path)

    clock = Clock(95.0)
    rot = rotation(tmp_path, source, clock, load=flaky)
    rot.start()
    deadline = time.monotonic() + 60
    with pytest.raises(BackendError):
        while time.monotonic() < deadline:
            rot.poll()
            time.sleep(0.02)
    rot.close()


def test_rotation_config(tmp_path: Path, source: Path) -> None:
    strong = load(source)
    try:
        assert rotation_for(load_config(None, env={}), strong) is None
        env = {"UPLIMIT_GAUGE_PERIOD_S": "3600", "UPLIMIT_GAUGE_DIRECTORY": str(tmp_path / "c"),
               "UPLIMIT_GAUGE_AUDIT": str(tmp_path / "a.jsonl")}  # fmt: skip
        with pytest.raises(ConfigError, match="secret_file"):
            rotation_for(load_config(None, env=env), strong)
        (tmp_path / "secret").write_bytes(SECRET)
        env["UPLIMIT_GAUGE_SECRET_FILE"] = str(tmp_path / "secret")
        rot = rotation_for(load_config(None, env=env), strong)
        assert rot is not None and rot.schedule.period_s == 3600 and rot.source == source
        with pytest.raises(ConfigError, match="lead_s"):
            rotation_for(load_config(None, env={**env, "UPLIMIT_GAUGE_LEAD_S": "3600"}), strong)
    finally:
        strong.close()


def test_an_older_audit_store_gains_the_gauge_column(tmp_path: Path) -> None:
    import sqlite3

    from uplimit.inner import audit as audit_module
    from uplimit.inner.audit import GenerationRecord

    old_schema = audit_module._SCHEMA.replace(",\n    gauge_id TEXT\n", "\n")
    assert old_schema != audit_module._SCHEMA
    with sqlite3.connect(tmp_path / "a.db") as db:
        db.executescript(old_schema)
    store = AuditStore(tmp_path / "a.db")
    rec = GenerationRecord(
        "r", 0, 0, True, "generate", 1, "ab", 3, {}, [1], [1], [], None, "x", None, "eos", 1.0,
        gauge_id="f" * 32,
    )  # fmt: skip
    store.record([rec])
    assert store.query(request_id="r")[0].gauge_id == "f" * 32
    store.close()
