"""Service configuration: one TOML file for both sides, with environment overrides.

Every key has a default, so an empty file (or none) runs the pinned pair on loopback. A key
`k` of section `s` is overridden by the environment variable `UPLIMIT_<S>_<K>` (upper case),
e.g. `UPLIMIT_OUTER_PORT=9000`; values are parsed as the key's type. Unknown sections or keys
are errors, so a typo never silently falls back to a default.

Both sides must agree on [coding] (frame size, weak-session sizes): the codec fingerprint
checks what changes coded bytes; the rest only has to fit.

    [models]  strong, weak ("strong"/"weak": the pinned pair; or a GGUF file / HF directory),
              backend ("" = llama.cpp for files, HF for directories), threads, calibration
    [coding]  frame_tokens, max_streams, max_context, tie_nats, tilt (the outer's defaults
              for compression-aware decoding)
    [link]    host, downlink_port, uplink_port, tick_s, max_latency_s, ledger,
              lifetime/per-day/per-second budget bytes (lifetime 0 = 1 % of the strong
              weights), downlink_log, downlink_log_max_bytes, downlink_log_backups,
              receive_counter, downlink_bytes_per_s, secret_file, inner_addresses
    [inner]   max_batch, best_of, scorer, reasoning_open/_close,
              max_reasoning_tokens, audit, draft_tokens, received_models, rollout_record,
              user (the confined inner's unprivileged user)
    [outer]   host, port, model_name, api_key, max_choices, monitor, admin_key, kernel_meter,
              status_interval_s, rollout_record, max_body_bytes, max_requests,
              max_connections, keys_file
    [gauge]   period_s (0 = no rotation), secret_file, origin, lead_s, dtype, directory, audit
              (docs/gauge.md: the inner serves a re-gauged copy of the strong model per period)
    [verifier] host, port, verdicts, metrics_port, metrics_host, max_queue (the spot-check
              verifier; the outer's `verifier` and `verify_rate` send it streams)
    [relay]   host, downlink_port, uplink_port, tick_s, ledger, lifetime/per-day/per-second
              budget bytes, downlink_log, secret_file, release, received_models,
              rollout_record, kernel_meter, user (`uplimit serve relay`: its uplink to the
              outer, and its confinement as root; docs/tiers.md)
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

from uplimit.errors import ConfigError

__all__ = [
    "CodingConfig",
    "Config",
    "GaugeConfig",
    "InnerConfig",
    "LinkConfig",
    "ModelsConfig",
    "OuterConfig",
    "RelayConfig",
    "Side",
    "VerifierConfig",
    "link_secret_path",
    "load_config",
    "relay_secret_path",
    "rollout_record_path",
]


def _home() -> Path:
    return Path(os.environ.get("UPLIMIT_HOME", Path.home() / ".cache" / "uplimit"))


@dataclass(frozen=True)
class ModelsConfig:
    strong: str = "strong"
    weak: str = "weak"
    backend: str = ""  # "", "llama" or "hf"
    threads: int = 0  # llama.cpp threads; 0: the backend's default
    calibration: str = ""  # a calibration JSON; "": the one shipped for the pair


@dataclass(frozen=True)
class CodingConfig:
    frame_tokens: int = 16  # tokens per stream per frame
    max_streams: int = 16  # streams in the coding table at once (weak sessions' size)
    max_context: int = 2048  # prompt + answer, per sequence
    # Compression-aware decoding for API requests that do not set it (the outer's API reads
    # these, `outer.app.ApiSettings`, which checks them): tie_nats at T = 0, tilt at T > 0.
    # 0: off, the strong model's exact output (docs/codec.md).
    tie_nats: float = 0.0
    tilt: float = 0.0


@dataclass(frozen=True)
class LinkConfig:
    host: str = "127.0.0.1"  # where the outer listens for the inner's two connections
    downlink_port: int = 7301
    uplink_port: int = 7302
    tick_s: float = 0.1
    # A frame that is not full waits up to this long for more tokens (`inner.scheduler`):
    # fewer, fuller frames cost fewer bits per token, text arrives in later, larger pieces.
    max_latency_s: float = 0.5
    ledger: str = ""  # SQLite path or postgresql:// URL; "": $UPLIMIT_HOME/ledger.db
    # 0: 1 % of the strong weights; the outer enforces it too, and knows that size only for
    # the pinned pair (`outer.serve.receive_budget_bytes`): set it for any other strong model.
    lifetime_budget_bytes: int = 0
    per_day_budget_bytes: int = 0  # 0: none
    per_second_budget_bytes: int = 0  # 0: none
    downlink_log: str = ""  # "": $UPLIMIT_HOME/downlink.jsonl
    # Past this size the downlink log rotates into this many backups (`link.inner_link`).
    downlink_log_max_bytes: int = 256 << 20
    downlink_log_backups: int = 4
    receive_counter: str = ""  # "": $UPLIMIT_HOME/received.db
    # The link's shared secret (`link.auth`; `uplimit link-secret` writes one, 0600), the same
    # file on both sides; missing is an error. "": $UPLIMIT_HOME/link.secret
    secret_file: str = ""
    inner_addresses: str = "127.0.0.1,::1"  # the outer takes link connections only from these
    # The inner refuses a faster downlink; the outer sends a rollout's model at 3/4 of it.
    downlink_bytes_per_s: int = 1 << 20


@dataclass(frozen=True)
class InnerConfig:
    max_batch: int = 8  # strong sequences generated at once
    best_of: int = 1  # candidates per stream when the request cannot say (the transport)
    scorer: str = "mean_logprob"
    reasoning_open: str = ""  # e.g. "<think>"; "" keeps nothing inside
    reasoning_close: str = ""  # e.g. "</think>"
    max_reasoning_tokens: int = 1024
    audit: str = ""  # "": $UPLIMIT_HOME/audit.db
    draft_tokens: int = 0  # weak-model drafts per step (speculative decoding); 0: off
    received_models: str = ""  # weak models a rollout sent down; "": $UPLIMIT_HOME/received
    rollout_record: str = ""  # the weak model a rollout switched to; "": ...rollout-inner.json
    # -- confinement (inner.confine) --
    user: str = "nobody"  # the confined inner runs as this unprivileged user


@dataclass(frozen=True)
class OuterConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "uplimit"
    api_key: str = ""  # "": no key needed
    metrics_port: int = 9464  # Prometheus exposition on `host`; 0: off (outer side only)
    max_choices: int = 8  # n
    # The spot-check verifier (`uplimit serve verifier`) as "host:port"; "": no spot checks.
    verifier: str = ""
    verify_rate: float = 0.05  # share of finished streams sent to the verifier, in [0, 1]
    # Bits/token monitor thresholds (JSON, as `uplimit redteam` writes them); "": off.
    monitor: str = ""
    admin_key: str = ""  # bearer token of /admin/*, /v1/uplimit/withheld and /status; "": none
    kernel_meter: str = ""  # kernel meter (namespace uplimit-NAME) the status page reads; "": none
    status_interval_s: float = 5.0  # the status page samples the meters this often
    rollout_record: str = ""  # the weak model a rollout switched to; "": ...rollout-outer.json
    # --- the public API's limits (docs/serving.md, "Limits") ---
    max_body_bytes: int = 0  # a request body's cap; 0: sized for coding.max_context
    max_requests: int = 256  # POST requests in flight; past it a 429 with Retry-After
    # Open connections (clients, idle keep-alives, GETs included); past it uvicorn's own 503.
    max_connections: int = 1024
    keys_file: str = ""  # API keys with limits (`uplimit keys`); "": only api_key

    def __post_init__(self) -> None:
        if not self.status_interval_s > 0:  # NaN too
            raise ConfigError(f"outer.status_interval_s must be > 0, got {self.status_interval_s}")
        if not 0.0 <= self.verify_rate <= 1.0:  # NaN too
            raise ConfigError(f"outer.verify_rate must be in [0, 1], got {self.verify_rate}")
        _ = self.verifier_address  # a malformed address fails at load

    @property
    def verifier_address(self) -> tuple[str, int] | None:
        """`verifier` as (host, port); None when spot checks are off."""
        if not self.verifier:
            return None
        host, sep, port = self.verifier.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")  # "[::1]:7303"
        if not (sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"outer.verifier must be host:port, got {self.verifier!r}")
        return host, int(port)


@dataclass(frozen=True)
class GaugeConfig:
    period_s: float = 0.0  # re-gauge the strong model's serving copy this often; 0: never
    secret_file: str = ""  # >= 16 secret bytes that derive every gauge: keep it off the weights
    origin: float = 0.0  # unix time at which epoch 0 starts
    lead_s: float = 600.0  # the next copy is prepared this long before its epoch starts
    dtype: str = "f16"  # the serving copy's type: "f16" or "f32" (exact, twice the size)
    directory: str = ""  # serving copies; "": $UPLIMIT_HOME/gauged
    audit: str = ""  # which gauge served when (JSONL); "": $UPLIMIT_HOME/gauge-audit.jsonl


@dataclass(frozen=True)
class VerifierConfig:
    """`uplimit serve verifier`: the spot-check verifier, on the inner side (docs/security.md)."""

    host: str = "127.0.0.1"  # where it listens for the outer's checks
    port: int = 7303
    verdicts: str = ""  # one JSON line per check; "": $UPLIMIT_HOME/verdicts.jsonl
    metrics_port: int = 0  # Prometheus exposition on metrics_host; 0: off
    # An inner-side port that the outer can read is an upload with no meter: keep it local.
    metrics_host: str = "127.0.0.1"
    max_queue: int = 64  # checks waiting for the model; more are dropped (and counted)

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ConfigError(f"verifier.max_queue must be >= 1, got {self.max_queue}")


# --- the relay tier (docs/tiers.md) ------------------------------------------------------------

RELEASES = ("stream", "tick")


@dataclass(frozen=True)
class RelayConfig:
    """`uplimit serve relay`: the link it uploads to the outer on, metered like an inner's.

    Towards the inner the relay is an outer ([link], [coding], [models]); its own users get
    the outer's API ([outer]). Only its uplink and its confinement (kernel_meter, user) are
    configured here."""

    host: str = "127.0.0.1"  # the outer's link address: the relay connects out to it
    downlink_port: int = 7311
    uplink_port: int = 7312
    tick_s: float = 0.1
    ledger: str = ""  # SQLite path or postgresql:// URL; "": $UPLIMIT_HOME/relay-ledger.db
    lifetime_budget_bytes: int = 0  # 0: the relay's own receive budget ([link])
    per_day_budget_bytes: int = 0  # 0: none
    per_second_budget_bytes: int = 0  # 0: none
    # Confinement (`relay.confine`): namespace uplimit-NAME behind the kernel quota, and the
    # unprivileged user the confined relay runs as.
    kernel_meter: str = "relay"
    user: str = "nobody"
    downlink_log: str = ""  # "": $UPLIMIT_HOME/relay-downlink.jsonl
    secret_file: str = ""  # the relay-outer link's secret; "": $UPLIMIT_HOME/relay.secret
    # When the outer's streams go up: "stream" once a stream has ended on the inner's link
    # (the outer's timing says when streams ended, no more), "tick" at each relay tick (text
    # streams, and the inner's frame timing reaches the outer rounded to the relay's ticks).
    release: str = "stream"
    # A rollout from the outer (docs/tiers.md, Rollouts): where its file is kept, and the weak
    # model the relay's uplink switched to. "": $UPLIMIT_HOME/relay-received, rollout-relay.json
    received_models: str = ""
    rollout_record: str = ""

    def __post_init__(self) -> None:
        if self.release not in RELEASES:
            raise ConfigError(f"relay.release must be one of {', '.join(RELEASES)}")
        if not self.tick_s > 0:  # NaN too
            raise ConfigError(f"relay.tick_s must be > 0, got {self.tick_s}")


def relay_secret_path(config: Config) -> Path:
    """The relay-outer link's secret (`[relay] secret_file`; the outer's `[link] secret_file`
    names the same bytes)."""
    return config.path(config.relay.secret_file, "relay.secret")


# --- end of the relay tier ---------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    coding: CodingConfig = field(default_factory=CodingConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    gauge: GaugeConfig = field(default_factory=GaugeConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)

    @property
    def reasoning(self) -> tuple[str, str] | None:
        i = self.inner
        if bool(i.reasoning_open) != bool(i.reasoning_close):
            raise ConfigError("set both inner.reasoning_open and inner.reasoning_close, or none")
        return (i.reasoning_open, i.reasoning_close) if i.reasoning_open else None

    def path(self, value: str, default_name: str) -> Path:
        """A configured file, or its default under $UPLIMIT_HOME (created)."""
        if value:
            return Path(value).expanduser()
        home = _home()
        home.mkdir(parents=True, exist_ok=True)
        return home / default_name


def _parse(value: Any, kind: type, where: str) -> Any:
    if isinstance(value, str) and kind in (int, float):
        try:
            return kind(value)
        except ValueError as e:
            raise ConfigError(f"{where}: cannot read {value!r} as {kind.__name__}") from e
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _section(cls: type, raw: Mapping[str, Any], name: str, env: Mapping[str, str]) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    types = get_type_hints(cls)
    unknown = set(raw) - set(types)
    if unknown:
        raise ConfigError(f"unknown key(s) in [{name}]: {', '.join(sorted(unknown))}")
    values = {k: _parse(v, types[k], f"{name}.{k}") for k, v in raw.items()}
    for key, kind in types.items():
        var = f"UPLIMIT_{name}_{key}".upper()
        if var in env:
            values[key] = _parse(env[var], kind, var)
    return cls(**values)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read `path` (TOML; None: defaults only), then apply `UPLIMIT_*` overrides from `env`."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
    sections = get_type_hints(Config)
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    config = Config(
        **{name: _section(kind, raw.get(name, {}), name, env) for name, kind in sections.items()}
    )
    _ = config.reasoning  # both markers or none
    return config


Side = Literal["inner", "outer", "relay"]  # "relay": a relay's uplink to the outer


def rollout_record_path(config: Config, side: Side) -> Path:
    """Where a side records the weak model a rollout switched it to (`models.active`)."""
    section = {"inner": config.inner, "outer": config.outer, "relay": config.relay}[side]
    return config.path(section.rollout_record, f"rollout-{side}.json")


def link_secret_path(config: Config) -> Path:
    """The link's shared secret (`[link] secret_file`; both sides name the same bytes)."""
    return config.path(config.link.secret_file, "link.secret")
