"""API keys with limits: a keys file, and the ring the gateway checks each request against.

The keys file (`[outer] keys_file`, JSON, written by `uplimit keys add|revoke`) holds, per key
name, the key's sha256 (never the key: the file does not let anyone in) and its limits:

    {"keys": {"alice": {"sha256": "<hex>", "bits_per_day": 1000000, "streams": 4,
                        "per_minute": 60, "revoked": false}}}

A limit that is null is off. `KeyRing` (in the gateway, `outer.gate`) finds a request's key by
comparing the token's sha256 with every key's in constant time, and refuses a request that
would take a key past one of its limits (a 429): streams open at once (a request holds `n`),
requests in the last minute, uploaded bits since midnight UTC. Usage is kept in memory: a
restart forgets today's, and the link's own budget still bounds everything. Per-key figures go
to the outer's metrics: `uplimit_api_requests_total{key,outcome}` and
`uplimit_api_uploaded_bits_total{key}`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from uplimit.errors import ConfigError

__all__ = ["ApiKey", "KeyLimits", "KeyRing", "add_key", "load_keys", "revoke_key"]

KEY_PREFIX = "upl-"
MINUTE_S = 60.0
DAY_S = 86_400


@dataclass(frozen=True)
class KeyLimits:
    bits_per_day: int | None = None  # uploaded bits since midnight UTC
    streams: int | None = None  # streams open at once
    per_minute: int | None = None  # requests in the last 60 s

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"a key's {name} must be a positive integer or null")


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str  # hex digest of the key
    limits: KeyLimits = field(default_factory=KeyLimits)
    revoked: bool = False


def _digest(token: bytes) -> str:
    return hashlib.sha256(token).hexdigest()


def load_keys(path: Path) -> dict[str, ApiKey]:
    """The keys file's keys by name (strict: anything malformed is a ConfigError)."""
    try:
        raw = json.loads(path.read_text())
        keys = {}
        for name, entry in raw["keys"].items():
            entry = dict(entry)
            sha256, revoked = entry.pop("sha256"), entry.pop("revoked", False)
            if not (isinstance(sha256, str) and len(sha256) == 64 and isinstance(revoked, bool)):
                raise ValueError(f"key {name!r}: sha256 must be 64 hex digits")
            bytes.fromhex(sha256)
            keys[name] = ApiKey(name, sha256, KeyLimits(**entry), revoked)
        return keys
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"keys file {path}: {e}") from e


def _save(path: Path, keys: dict[str, ApiKey]) -> None:
    entries = {
        k.name: {"sha256": k.sha256, **asdict(k.limits), "revoked": k.revoked}
        for k in keys.values()
    }
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"keys": entries}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def add_key(path: Path, name: str, limits: KeyLimits) -> str:
    """A new key named `name`, recorded in the keys file; returns the key (shown only now)."""
    if not (name and name.isascii() and name.replace("-", "").replace("_", "").isalnum()):
        raise ConfigError(f"a key name is letters, digits, - and _; got {name!r}")
    keys = load_keys(path)
    if name in keys:
        raise ConfigError(f"a key named {name!r} exists (revoke it, or choose another name)")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    keys[name] = ApiKey(name, _digest(key.encode()), limits)
    _save(path, keys)
    return key


def revoke_key(path: Path, name: str) -> None:
    keys = load_keys(path)
    if name not in keys:
        raise ConfigError(f"no key named {name!r} in {path}")
    keys[name] = replace(keys[name], revoked=True)
    _save(path, keys)


@dataclass
class _Usage:
    streams: int = 0
    recent: deque[float] = field(default_factory=deque)  # request times, the last minute's
    day: int = 0  # days since the epoch (UTC) that `bits` counts
    bits: float = 0.0


class KeyRing:
    """The keys the gateway accepts, and each one's usage (module doc)."""

    def __init__(
        self,
        keys: dict[str, ApiKey],
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = [k for k in keys.values() if not k.revoked]
        self.clock = clock
        self._usage = {k.name: _Usage() for k in self.keys}
        self.requests = Counter(
            "uplimit_api_requests", "API requests by key and outcome.", ["key", "outcome"],
            registry=registry,
        )  # fmt: skip
        self.bits = Counter(
            "uplimit_api_uploaded_bits", "Uplink bits of the answers, by key.", ["key"],
            registry=registry,
        )  # fmt: skip

    def find(self, token: bytes) -> ApiKey | None:
        """The key whose sha256 matches; every key is compared, in constant time each."""
        digest = _digest(token).encode()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.sha256.encode()):
                found = key
        return found

    def admit(self, key: ApiKey, streams: int) -> str | None:
        """Take one request of `streams` streams for `key`; the limit it would pass, if any
        (then nothing is taken)."""
        use, limits, now = self._usage[key.name], key.limits, self.clock()
        while use.recent and use.recent[0] <= now - MINUTE_S:
            use.recent.popleft()
        self._roll(use, now)
        if limits.per_minute is not None and len(use.recent) >= limits.per_minute:
            over = "per_minute"
        elif limits.streams is not None and use.streams + streams > limits.streams:
            over = "streams"
        elif limits.bits_per_day is not None and use.bits >= limits.bits_per_day:
            over = "bits_per_day"
        else:
            use.recent.append(now)
            use.streams += streams
            self.requests.labels(key.name, "admitted").inc()
            return None
        self.requests.labels(key.name, f"over_{over}").inc()
        return over

    def release(self, key: ApiKey, streams: int) -> None:
        self._usage[key.name].streams -= streams

    def charge(self, name: str, bits: float) -> None:
        """An answer's uploaded bits, to its key's day."""
        use = self._usage[name]
        self._roll(use, self.clock())
        use.bits += bits
        self.bits.labels(name).inc(bits)

    @staticmethod
    def _roll(use: _Usage, now: float) -> None:
        day = int(now // DAY_S)
        if day != use.day:
            use.day, use.bits = day, 0.0
