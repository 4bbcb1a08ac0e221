"""`uplimit serve inner`: load the pair, connect to the outer side, serve until told to stop.

The inner connects out to the outer (both connections: the outer listens), so the inner host
needs no listening port at all. Until the outer is up, the inner retries the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from uplimit.coding.calibration import configured as configured_calibration
from uplimit.config import Config, link_secret_path, rollout_record_path
from uplimit.errors import ConfigError, LinkClosed
from uplimit.inner.audit import AuditStore
from uplimit.inner.scheduler import SchedulerConfig
from uplimit.inner.scoring import SCORERS
from uplimit.inner.service import InnerService
from uplimit.link.auth import load_secret
from uplimit.link.budget import Budgets
from uplimit.link.inner_link import InnerLink, serve_frames
from uplimit.link.ledger import Ledger, open_served
from uplimit.link.rollout import WeakRollout
from uplimit.models.base import LanguageModel
from uplimit.models.loading import load_configured, resolve
from uplimit.wire.fingerprint import codec_fingerprint
from uplimit.wire.protocol import DownlinkLimits, EndReason

if TYPE_CHECKING:
    from uplimit.inner.rotation import GaugeRotation

__all__ = [
    "budgets_for",
    "ledger_location",
    "rotation_for",
    "scheduler_config",
    "serve_inner",
    "weights_bytes",
]

log = logging.getLogger(__name__)

CONNECT_RETRY_S = 0.5


def weights_bytes(path: str | Path) -> int:
    """Size of a model's weights on disk: the GGUF file, or a directory's weight files."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))


def budgets_for(config: Config) -> Budgets:
    """The configured budgets; lifetime 0 means 1 % of the configured strong weights' size
    (the file on disk: no model is loaded)."""
    link = config.link
    lifetime = link.lifetime_budget_bytes or (
        Budgets.default_for(weights_bytes(resolve(config.models.strong))).lifetime_bytes
    )
    return Budgets(
        lifetime, link.per_day_budget_bytes or None, link.per_second_budget_bytes or None
    )


def ledger_location(config: Config) -> str:
    """The configured ledger: a PostgreSQL URL, or a SQLite path ($UPLIMIT_HOME/ledger.db)."""
    return str(config.path(config.link.ledger, "ledger.db"))


def scheduler_config(config: Config) -> SchedulerConfig:
    if config.inner.scorer not in SCORERS:
        raise ConfigError(f"unknown scorer {config.inner.scorer!r}: one of {', '.join(SCORERS)}")
    return SchedulerConfig(
        max_batch=config.inner.max_batch,
        max_streams=config.coding.max_streams,
        max_context=config.coding.max_context,
        frame_tokens=config.coding.frame_tokens,
        reasoning=config.reasoning,
        max_reasoning_tokens=config.inner.max_reasoning_tokens,
        max_latency_s=config.link.max_latency_s,
        tick_s=config.link.tick_s,
        draft_tokens=config.inner.draft_tokens,
        scorer=SCORERS[config.inner.scorer],
    )


def rotation_for(config: Config, strong: LanguageModel) -> GaugeRotation | None:
    """The configured gauge rotation of `strong`'s file (its master copy), or None (period 0).

    Budgets stay computed from the master: a float serving copy is larger, not more to steal.
    """
    g = config.gauge
    if g.period_s <= 0:
        return None
    from uplimit.gauge.schedule import GaugeAudit, GaugeSchedule
    from uplimit.inner.rotation import GaugeRotation

    if not Path(strong.info.path).is_file():
        raise ConfigError(f"gauge rotation serves GGUF copies: {strong.info.path} is not a file")
    if not g.secret_file:
        raise ConfigError("gauge.period_s > 0 needs gauge.secret_file")
    try:
        secret = Path(g.secret_file).expanduser().read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read gauge.secret_file: {e}") from e

    def load(path: Path) -> LanguageModel:
        return load_configured(path, config.models)

    return GaugeRotation(
        GaugeSchedule(secret, g.period_s, g.origin),
        GaugeAudit(config.path(g.audit, "gauge-audit.jsonl")),
        config.path(g.directory, "gauged"),
        strong.info.path,
        load,
        lead_s=g.lead_s,
        dtype=g.dtype,
    )


async def serve_inner(
    config: Config,
    strong: LanguageModel,
    weak: LanguageModel,
    *,
    host: str | None = None,
    connect_timeout_s: float = 300.0,
    ledger: Ledger | None = None,
    confined: bool = False,
) -> EndReason:
    """Serve one link to its end; returns why it ended (SHUTDOWN, or a budget).

    `ledger`: what to charge (a confined inner's `ChargeClient`; default: the configured
    ledger, opened here). `confined`: what the handshake tells the outer (`inner.confine`)."""
    calibration = configured_calibration(config.models, weak.info.file_sha256)
    audit = AuditStore(config.path(config.inner.audit, "audit.db"))
    if ledger is None:
        ledger = open_served(ledger_location(config), budgets_for(config))
    rotation = rotation_for(config, strong)
    if rotation is not None:  # the first copy may take minutes to write (docs/gauge.md)
        strong = (await asyncio.to_thread(rotation.start)).model
    service = InnerService(
        strong, weak, calibration, scheduler_config(config), audit=audit,
        best_of=config.inner.best_of, rotation=rotation,
    )  # fmt: skip
    rollout = WeakRollout(
        strong, service.frame_config, service.switch_weak,
        config.path(config.inner.received_models, "received"),
        rollout_record_path(config, "inner"), lambda path: load_configured(path, config.models),
    )  # fmt: skip
    try:
        fingerprint = codec_fingerprint(weak.info, calibration, service.frame_config)
        link = await _connect(config, host or config.link.host, ledger, fingerprint,
                              weak.info.n_vocab, connect_timeout_s, confined)  # fmt: skip
        log.info("inner: link up, serving")
        service.start()
        return await serve_frames(link, service, models=rollout)
    finally:
        rollout.close()
        await asyncio.to_thread(service.close)
        if rotation is not None:
            rotation.close()
        audit.close()
        ledger.close()


async def _connect(
    config: Config,
    host: str,
    ledger: Ledger,
    fingerprint: dict[str, str],
    n_vocab: int,
    timeout_s: float,
    confined: bool,
) -> InnerLink:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await InnerLink.connect(
                host, config.link.downlink_port, config.link.uplink_port, ledger, fingerprint,
                secret=load_secret(link_secret_path(config)),
                log_path=config.path(config.link.downlink_log, "downlink.jsonl"),
                log_max_bytes=config.link.downlink_log_max_bytes,
                log_backups=config.link.downlink_log_backups,
                tick_s=config.link.tick_s, n_vocab=n_vocab,
                limits=DownlinkLimits(bytes_per_s=float(config.link.downlink_bytes_per_s)),
                confined=confined,
            )  # fmt: skip
        except LinkClosed:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(CONNECT_RETRY_S)
