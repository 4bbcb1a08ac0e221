"""`uplimit serve relay`: the intermediate tier between the inner and the outer (docs/tiers.md).

One process, two links, two meters:

- towards the inner it is an outer: `outer.serve.serve_outer` with its [link], [coding] and
  [outer] sections: it listens for the inner, holds its own receive counter and receive budget,
  decodes with the weak model, and serves its own users the OpenAI API. Their streams end
  here: their text never goes further.
- towards the outer it is an inner (`forward`, beside that server): its own ledger and budgets
  ([relay]), its own tick schedule, an `InnerLink` that connects out to the outer, and
  `RelayFrames` as the frame source, which opens each of the outer's streams towards the inner
  and codes the tokens that come back again with its own `FrameEncoder`.

The uplink to the outer starts once the inner's link serves (a stream from the outer could
not be opened before). When the outer's link ends (SHUTDOWN, a failure, a protocol violation
of the outer's, a rollout the relay refuses) the relay connects to the next outer; when the
relay's budget ended it, it stays down and the relay serves its own users only. If the
inner's link stops serving, the relay ends the outer's link with END(error) and stops (fail
closed, as an inner that fails).

A weak-model rollout from the outer is taken on link 2 and passed on down link 1
(`relay.rollout`); each link codes with the weak model its own rollout record names, so a
restarted relay keeps both (`_active`).

As root, `uplimit serve relay` runs this confined (`relay.confine`): charging through the
launcher's charge service, and telling the outer so at link 2's handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable

from uplimit.coding.calibration import Calibration
from uplimit.coding.calibration import configured as configured_calibration
from uplimit.config import Config, Side, relay_secret_path, rollout_record_path
from uplimit.errors import BudgetExhausted, ConfigError, LinkClosed, ProtocolError
from uplimit.link.auth import load_secret
from uplimit.link.budget import Budgets
from uplimit.link.inner_link import InnerLink, serve_frames
from uplimit.link.ledger import Ledger, open_served
from uplimit.models.active import ActiveWeak, with_active_weak
from uplimit.models.base import LanguageModel
from uplimit.models.loading import load_configured
from uplimit.outer.rollout import Rollout
from uplimit.outer.serve import receive_budget_bytes, serve_outer
from uplimit.outer.service import OuterService
from uplimit.relay.frames import RelayFrames
from uplimit.relay.rollout import RelaySink, RelayWeak
from uplimit.wire.fingerprint import codec_fingerprint
from uplimit.wire.frame import FrameConfig, FrameEncoder
from uplimit.wire.protocol import DownlinkLimits, EndReason
from uplimit.wire.receiver import LinkState
from uplimit.wire.request import GenerationRequest

__all__ = ["forward_link", "relay_budgets", "relay_ledger_location", "serve_relay"]

log = logging.getLogger(__name__)

CONNECT_RETRY_S = 0.5
UPSTREAM_POLL_S = 0.1


def relay_budgets(config: Config) -> Budgets:
    """The relay's upload budgets ([relay]); lifetime 0: its receive budget from the inner."""
    r = config.relay
    return Budgets(
        r.lifetime_budget_bytes or receive_budget_bytes(config),
        r.per_day_budget_bytes or None,
        r.per_second_budget_bytes or None,
    )


def relay_ledger_location(config: Config) -> str:
    """The relay's ledger: a PostgreSQL URL, or a SQLite path ($UPLIMIT_HOME/relay-ledger.db)."""
    return str(config.path(config.relay.ledger, "relay-ledger.db"))


async def serve_relay(
    config: Config,
    weak: LanguageModel,
    *,
    on_listening: Callable[[], None] | None = None,
    ledger: Ledger | None = None,
    confined: bool = False,
) -> None:
    """Serve until a signal (module doc); the relay's ledger must exist (`uplimit budget init
    --relay`). `ledger`: what to charge (a confined relay's `ChargeClient`; default: the
    configured one, opened here). `confined`: what link 2's handshake tells the outer
    (`relay.confine`)."""
    if config.reasoning is not None:
        raise ConfigError("the relay does not forward withheld reasoning: unset [inner] reasoning")
    if ledger is None:
        ledger = open_served(relay_ledger_location(config), relay_budgets(config))
    inner_side, loaded = await _active(config, "outer", weak)  # link 1, as an outer's
    try:
        await serve_outer(
            inner_side, loaded or weak, on_listening=on_listening,
            beside=functools.partial(_forward, config, weak, ledger, confined=confined),
        )  # fmt: skip
    finally:
        ledger.close()
        if loaded is not None:
            loaded.close()


async def _active(
    config: Config, side: Side, weak: LanguageModel
) -> tuple[Config, LanguageModel | None]:
    """`config` with the weak model and calibration `side`'s rollout record names, and that
    model loaded if it is not `weak` (None: `weak` is it)."""
    record = ActiveWeak.load(rollout_record_path(config, side))
    if record is None:
        return config, None
    active = with_active_weak(config, side)
    if record.sha256 == weak.info.file_sha256:
        return active, None
    return active, await asyncio.to_thread(load_configured, active.models.weak, config.models)


async def _forward(
    config: Config,
    weak: LanguageModel,
    ledger: Ledger,
    service: OuterService,
    below: Rollout,
    *,
    confined: bool,
) -> None:
    """The relay's uplink to the outer, link after link (module doc); `below`: the rollout
    of link 1, which passes the outer's rollouts on."""
    while service.state is LinkState.HANDSHAKING:
        await asyncio.sleep(UPSTREAM_POLL_S)
    link2, loaded = await _active(config, "relay", weak)
    current = loaded or weak
    coding = config.coding
    models = RelayWeak(
        current, configured_calibration(link2.models, current.info.file_sha256),
        directory=config.path(config.relay.received_models, "relay-received"),
        record=rollout_record_path(config, "relay"),
        load=lambda path: load_configured(path, config.models),
        below=below, session_size=(coding.max_streams, coding.max_context + 1),
    )  # fmt: skip
    if loaded is not None:
        models.own(loaded, models.calibration)
    try:
        await _forward_links(config, models, ledger, service, confined=confined)
    finally:
        models.close()


async def _forward_links(
    config: Config, models: RelayWeak, ledger: Ledger, service: OuterService, *, confined: bool
) -> None:
    while True:
        try:
            reason = await _serve_outer_link(config, models, ledger, service, confined=confined)
        except LinkClosed as e:  # the outer went without a word (killed, a network failure)
            if service.state is not LinkState.SERVING:
                raise
            log.error("relay: the link to the outer failed (%s); waiting for the next outer", e)
            continue
        except ProtocolError as e:  # END(error) went up; the relay's users need no outer
            log.error("relay: %s; the link to the outer ended, waiting for the next outer", e)
            await asyncio.sleep(CONNECT_RETRY_S)
            continue
        except BudgetExhausted as e:  # before the link: not even its connection can be paid
            log.error("relay: %s; no link to the outer", e)
            return
        if reason.exhausted:
            log.error("relay: its %s budget ended the link to the outer", reason.name.lower())
            return
        log.info("relay: the link to the outer ended (%s); waiting for the next outer", reason)


async def _serve_outer_link(
    config: Config, models: RelayWeak, ledger: Ledger, service: OuterService, *, confined: bool
) -> EndReason:
    weak, calibration = models.weak, models.calibration
    coding = config.coding
    frame_config = FrameConfig(coding.frame_tokens, weak.info.n_vocab)

    async def connect(fingerprint: dict[str, str]) -> InnerLink:
        return await _connect(config, ledger, fingerprint, weak.info.n_vocab, service, confined)

    return await forward_link(
        service, weak, calibration, frame_config, connect,
        max_streams=coding.max_streams, max_context=coding.max_context,
        release=config.relay.release, models=models.sink,
    )  # fmt: skip


async def forward_link(
    service: OuterService,
    weak: LanguageModel,
    calibration: Calibration,
    frame_config: FrameConfig,
    connect: Callable[[dict[str, str]], Awaitable[InnerLink]],
    *,
    max_streams: int,
    max_context: int,
    release: str,
    models: Callable[[FrameEncoder], RelaySink] | None = None,
) -> EndReason:
    """One uplink to the outer, to its end: `connect(fingerprint)` opens it (the relay's
    encoder's fingerprint), `RelayFrames` feeds it from `service`'s streams (the red team's
    relayed runs use it too, `redteam.relayed`); `models(encoder)`, if given, takes the
    outer's rollouts (`relay.rollout`); without, a rollout ends the link with END(error)."""
    with weak.session(max_streams, max_context + 1) as session:
        encoder = FrameEncoder(session, weak.info.eos_ids, calibration, frame_config)
        source = RelayFrames(
            service, encoder, asyncio.get_running_loop(), eos_ids=weak.info.eos_ids,
            max_streams=max_streams, release=release,
        )  # fmt: skip
        sink = models(encoder) if models is not None else None
        previous = service.on_stream_end

        def ended(request: GenerationRequest, tokens: tuple[int, ...]) -> None:
            if previous is not None:
                previous(request, tokens)
            source.stream_ended(request, tokens)

        service.on_stream_end = ended
        try:
            link = await connect(codec_fingerprint(weak.info, calibration, frame_config))
            log.info("relay: link to the outer up, forwarding")
            serving = asyncio.create_task(serve_frames(link, source, models=sink))
            try:
                return await asyncio.shield(serving)
            except asyncio.CancelledError:  # the relay is stopping: END up, not a silence
                await link.end(EndReason.SHUTDOWN)
                serving.cancel()
                await asyncio.gather(serving, return_exceptions=True)
                raise
        finally:
            service.on_stream_end = previous
            with contextlib.suppress(Exception):
                await source.aclose()
            if sink is not None:
                sink.close()
            encoder.close()


async def _connect(
    config: Config,
    ledger: Ledger,
    fingerprint: dict[str, str],
    n_vocab: int,
    service: OuterService,
    confined: bool,
) -> InnerLink:
    """Connect to the outer as an inner does, retrying while the inner's link serves."""
    r = config.relay
    while True:
        if service.state is not LinkState.SERVING:
            raise LinkClosed(f"the relay's link to the inner is {service.state}")
        try:
            return await InnerLink.connect(
                r.host, r.downlink_port, r.uplink_port, ledger, fingerprint,
                secret=load_secret(relay_secret_path(config)),
                log_path=config.path(r.downlink_log, "relay-downlink.jsonl"),
                tick_s=r.tick_s, n_vocab=n_vocab,
                limits=DownlinkLimits(bytes_per_s=float(config.link.downlink_bytes_per_s)),
                confined=confined,
            )  # fmt: skip
        except LinkClosed:
            await asyncio.sleep(CONNECT_RETRY_S)
