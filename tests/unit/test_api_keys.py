"""API keys with limits (`outer.keys`, `uplimit keys`): the file, the ring's limits."""

from __future__ import annotations

import json
import stat

import pytest
from typer.testing import CliRunner

from uplimit.cli import app
from uplimit.errors import ConfigError
from uplimit.outer.keys import DAY_S, KeyLimits, KeyRing, add_key, load_keys


def test_keys_add_list_revoke(tmp_path):
    path = tmp_path / "keys.json"
    runner = CliRunner()
    out = runner.invoke(app, ["keys", "add", "alice", "--file", str(path), "--per-minute", "60"])
    assert out.exit_code == 0, out.output
    key = out.output.strip()
    assert key.startswith("upl-") and len(key) > 40
    # The file keeps the key's sha256, never the key, and only its owner may read it.
    assert key not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = KeyRing(load_keys(path))
    assert ring.find(key.encode()).name == "alice"
    assert ring.find(key.encode()[:-1] + b"x") is None
    listed = runner.invoke(app, ["keys", "list", "--file", str(path)])
    assert "alice" in listed.output and "60" in listed.output
    again = runner.invoke(app, ["keys", "add", "alice", "--file", str(path)])
    assert isinstance(again.exception, ConfigError) and "exists" in str(again.exception)
    assert runner.invoke(app, ["keys", "revoke", "alice", "--file", str(path)]).exit_code == 0
    assert KeyRing(load_keys(path)).find(key.encode()) is None  # revoked: refused


def test_a_malformed_keys_file_is_refused(tmp_path):
    path = tmp_path / "keys.json"
    for bad in (
        {"keys": {"a": {"sha256": "00"}}},
        {"keys": {"a": {"sha256": "0" * 64, "streams": 0}}},
        [],
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError):
            load_keys(path)


def test_the_ring_refuses_past_each_limit(tmp_path):
    now = [10 * DAY_S + 100.0]
    path = tmp_path / "keys.json"
    add_key(path, "minute", KeyLimits(per_minute=2))
    add_key(path, "streams", KeyLimits(streams=3))
    add_key(path, "bits", KeyLimits(bits_per_day=1000))
    keys = load_keys(path)
    ring = KeyRing(keys, clock=lambda: now[0])
    minute, streams, bits = keys["minute"], keys["streams"], keys["bits"]
    assert ring.admit(minute, 1) is None and ring.admit(minute, 1) is None
    assert ring.admit(minute, 1) == "per_minute"
    now[0] += 61
    assert ring.admit(minute, 1) is None  # a minute later
    assert ring.admit(streams, 2) is None
    assert ring.admit(streams, 2) == "streams"  # 4 open would pass 3
    ring.release(streams, 2)
    assert ring.admit(streams, 3) is None
    assert ring.admit(bits, 1) is None
    ring.charge("bits", 1000.0)
    assert ring.admit(bits, 1) == "bits_per_day"
    now[0] += DAY_S  # the next day (UTC) starts again
    assert ring.admit(bits, 1) is None
    assert ring.requests.labels("bits", "over_bits_per_day")._value.get() == 1
