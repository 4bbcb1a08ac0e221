"""The relay, confined as the inner is: its own network namespace behind the kernel quota, no
capabilities, an unprivileged user (`[relay] user`), and charge-only access to its ledger.

`uplimit serve relay` run as root is a launcher (`link.confine.serve`, shared with the inner's):
it serves the relay's ledger (`[relay] ledger`) charge-only, builds the kernel meter
`[relay] kernel_meter` (default "relay") with the quota `kernel_quota_bytes(the relay's lifetime
budget)`, and starts `uplimit serve relay --charge-socket ...` inside the namespace as the user,
with copies of both links' secrets only that user can read. The child claims confinement at
link 2's handshake after `check_confined`, so the outer's `uplimit_inner_confined` is 1.

Unlike the inner, the relay also *accepts* connections: link 1's two from the inner (`[link]
host` and ports; the launcher forwards them only from `[link] inner_addresses`), and its own
users' API and metrics (`[outer] host`, `port`, `metrics_port`). The launcher forwards these
into the namespace, where the child listens on the namespace's address; it forwards the
relay's link 2 from the veth's outer end to `[relay] host`'s two ports. The namespace's
nftables rules (`link.kernel.Gate`) then sort what the relay sends:

- **counted by the quota**: the connections the namespace opens to the veth's outer end on
  link 2's two ports, i.e. everything the relay sends the outer: frames, its handshake and
  refusals, and the ACKs for what the outer sends down. The relay's ledger charges the same
  bytes' payload before each write, so the kernel's TCP payload count equals the ledger's wire
  bytes.
- **passing uncounted** ("served"): packets on connections opened *into* the namespace
  (conntrack direction reply) from one of the forwarded ports: link 1's downlink to the inner
  (prompts, CANCEL, SHUTDOWN) and ACKs for the inner's frames, and the answers to the relay's
  own users. That is safe because those replies reach only the peers the launcher forwarded
  them for: the inner (allowed addresses only), whose weights are not the relay's to leak and
  whose own uploads pass its own quota, and the relay's users, who are in the intermediate tier
  (keep `[outer] host` off the outer's network, as for any service whose text stays there).
  Conntrack takes a connection's direction from its first packet, so no connection the relay
  opens itself, whatever source port it binds, passes here.
- **dropped** ("refused"): anything else the namespace sends, to any address or port; it has
  no route past the veth anyway. A spot-check verifier (`[outer] verifier`) is not reachable
  from inside, so a confined relay refuses to start with one configured.

Once the quota drops a packet the launcher closes the forwarded link-2 connections (an ALARM
line), so the outer fails the link and its users get 503s, and the relay goes on serving its
own users. `--unconfined` (and non-root, which otherwise refuses) serves in process with an
ALARM line at start; the handshake then says unconfined.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uplimit
from uplimit.config import Config, link_secret_path, relay_secret_path
from uplimit.errors import ConfigError
from uplimit.link.auth import allowed_addresses, load_secret
from uplimit.link.confine import (
    Confinement,
    Inbound,
    Launch,
    check_access,
    give,
    kernel_quota_bytes,
    places,
    require_confinable,
    serve,
    unprivileged,
)
from uplimit.link.kernel import Gate, KernelMeter
from uplimit.link.ledger import open_served
from uplimit.models.loading import resolve
from uplimit.relay.serve import relay_budgets, relay_ledger_location

__all__ = ["UNCONFINED_ALARM", "run_confined"]

UNCONFINED_ALARM = (
    "ALARM unconfined: the relay serves without its network namespace, kernel quota,"
    " unprivileged user or charge-only ledger (--unconfined): a compromised relay can write"
    " around its ledger to the outer"
)


def _written(config: Config) -> dict[str, tuple[str, str]]:
    """Environment variable -> (configured value, default name) for each file the relay
    writes: its receive count of link 1, link 2's downlink log, each link's rollout record, and
    the weak models a rollout from the outer sends it."""
    c = config
    return {
        "UPLIMIT_LINK_RECEIVE_COUNTER": (c.link.receive_counter, "received.db"),
        "UPLIMIT_RELAY_DOWNLINK_LOG": (c.relay.downlink_log, "relay-downlink.jsonl"),
        "UPLIMIT_OUTER_ROLLOUT_RECORD": (c.outer.rollout_record, "rollout-outer.json"),
        "UPLIMIT_RELAY_ROLLOUT_RECORD": (c.relay.rollout_record, "rollout-relay.json"),
        "UPLIMIT_RELAY_RECEIVED_MODELS": (c.relay.received_models, "relay-received"),
    }


_DIRECTORIES = frozenset({"UPLIMIT_RELAY_RECEIVED_MODELS"})  # the rest are files


def _check_access(config: Config, config_path: Path | None, user: tuple[int, int]) -> None:
    ledger = relay_ledger_location(config)
    unwritable = [Path(uplimit.__file__).parent, Path(sys.prefix)]
    if not ledger.startswith(("postgresql://", "postgres://")):
        unwritable += [Path(ledger).parent, *Path(ledger).parent.glob(Path(ledger).name + "*")]
    weak = resolve(config.models.weak)
    readable = [weak, *(weak.iterdir() if weak.is_dir() else [])]
    read = (config.outer.keys_file, config.outer.monitor, config_path)
    readable += [Path(p).expanduser() for p in read if p]
    check_access(user, "relay", unwritable=unwritable, readable=readable)


def run_confined(
    config: Config,
    config_path: Path | None,
    *,
    on_launch: Callable[[Launch], None] | None = None,
) -> Coroutine[Any, Any, int]:
    """Check and prepare everything now (raising `ConfigError` if the relay cannot be
    confined), then return the coroutine that runs the confined relay until it exits and
    gives its exit status (module doc)."""
    require_confinable("the relay")
    if config.outer.verifier_address is not None:
        raise ConfigError(
            "a confined relay reaches nothing but the outer's link: unset [outer] verifier"
        )
    account = unprivileged(config.relay.user, "relay.user")
    user = (account.pw_uid, account.pw_gid)
    where, budgets = relay_ledger_location(config), relay_budgets(config)
    env, dirs = places(config.path("", "relay"), _written(config), _DIRECTORIES)
    _check_access(config, config_path, user)
    give(dirs, where, user, "relay")
    secrets = {
        "UPLIMIT_LINK_SECRET_FILE": load_secret(link_secret_path(config)),
        "UPLIMIT_RELAY_SECRET_FILE": load_secret(relay_secret_path(config)),
    }
    link, outer, relay = config.link, config.outer, config.relay
    api = (outer.port, outer.metrics_port) if outer.metrics_port else (outer.port,)
    inbound = [
        Inbound(link.host, (link.downlink_port, link.uplink_port),
                allowed_addresses(link.inner_addresses)),
        Inbound(outer.host, api),
    ]  # fmt: skip
    uplink = (relay.downlink_port, relay.uplink_port)
    gate = Gate(serves=(link.downlink_port, link.uplink_port, *api), connects=uplink)
    meter = KernelMeter(relay.kernel_meter, kernel_quota_bytes(budgets.lifetime_bytes), gate=gate)
    # Inside, the relay listens on the namespace's address and reaches the outer through the
    # launcher, whose end of the veth is then the only peer of link 1; it reads no kernel meter.
    env |= {
        "UPLIMIT_LINK_HOST": meter.inner_address,
        "UPLIMIT_OUTER_HOST": meter.inner_address,
        "UPLIMIT_LINK_INNER_ADDRESSES": meter.outer_address,
        "UPLIMIT_RELAY_HOST": meter.outer_address,
        "UPLIMIT_OUTER_KERNEL_METER": "",
    }
    argv = ["serve", "relay", *(["--config", str(config_path)] if config_path else [])]
    return serve(
        Confinement(
            "relay", meter, open_served(where, budgets), account, argv,
            upstream=(relay.host, uplink), env=env, secrets=secrets, inbound=inbound,
            forward_signals=True,
        ),
        on_launch,
    )  # fmt: skip
