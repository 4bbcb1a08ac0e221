"""The inner's downlink log (#16 item 8): every message a line, disk use bounded by rotation,
and a write that fails raises instead of leaving a silent gap."""

from __future__ import annotations

import json

import pytest

from uplimit.coding.sampling import SamplingParams
from uplimit.errors import ConfigError
from uplimit.link.inner_link import DownlinkLog
from uplimit.wire.protocol import Cancel, OpenStream
from uplimit.wire.streams import StreamSpec


def test_the_log_rotates_and_keeps_its_newest_lines(tmp_path):
    path = tmp_path / "downlink.jsonl"
    log = DownlinkLog(path, max_bytes=4096, backups=2)
    for i in range(2000):
        spec = StreamSpec(i, tuple(range(1, 20)), SamplingParams(), i, 16)
        log.message(OpenStream(spec, b'{"request_id":"r"}'))
        log.message(Cancel(i))
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["downlink.jsonl", "downlink.jsonl.1", "downlink.jsonl.2"]
    assert all(f.stat().st_size <= 4096 for f in files)
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["type"] == "cancel" and last["stream_id"] == 1999
    lines = [json.loads(x) for f in reversed(files) for x in f.read_text().splitlines()]
    ids = [x["stream_id"] for x in lines]
    assert ids == sorted(ids) and ids[-1] == 1999  # the newest, in order, nothing torn


def test_without_a_cap_nothing_is_dropped(tmp_path):
    log = DownlinkLog(tmp_path / "d.jsonl", max_bytes=0, backups=0)
    for i in range(300):
        log.message(Cancel(i))
    log.close()
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 300
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]


def test_a_write_that_fails_raises(tmp_path):
    log = DownlinkLog("/dev/full", max_bytes=0, backups=0)
    with pytest.raises(OSError):
        log.message(Cancel(1))
    log.close()
    for bad in ({"max_bytes": -1}, {"max_bytes": 10, "backups": 0}):
        with pytest.raises(ConfigError):
            DownlinkLog(tmp_path / "x.jsonl", **bad)
    with pytest.raises(ConfigError):
        DownlinkLog(tmp_path / "missing" / "x.jsonl")
