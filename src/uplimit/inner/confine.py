"""The inner side, confined: its own network namespace behind the kernel quota, no capabilities,
an unprivileged user, and charge-only access to the ledger.

`uplimit serve inner` run as root (and the inner half of `serve both`) is a *launcher*: it
stays root, outside the namespace, and

1. opens the ledger (which must exist: `uplimit budget init`) and serves it charge-only on a
   unix socket (`link.charge_service`) that only the inner's user can open;
2. builds the kernel meter (`link.kernel`, named `[outer] kernel_meter` or "inner") with the
   quota `kernel_quota_bytes(lifetime budget)`;
3. relays the inner's two connections from the outer end of the veth to the outer side
   (`[link] host`, or `--host`): the namespace has no other way out, and everything that
   leaves it has passed the quota;
4. checks, by probing as that user, that the user can run the code (the interpreter, the
   virtualenv, the checkout) and read the configuration and the models, but cannot write the
   code, the virtualenv or the ledger's files and directory; gives the user the directories
   of the files the inner writes (audit store, downlink log, received models, rollout
   record, gauge copies), which must not be the ledger's; keys left unset put those files
   under `$UPLIMIT_HOME/inner/`;
5. starts `uplimit serve inner --charge-socket ...` inside the namespace as `[inner] user`
   with every capability dropped (`setpriv`), with a copy of the link's secret only that user
   can read (the original stays root's), and waits for it; then removes the namespace, the
   socket, the copy and the relay.

The generic steps (charge service, namespace, forwarding, secret copies, child, quota watch,
teardown) are `link.confine`'s, shared with the relay's launcher (`relay.confine`); once the
quota drops a packet, the launcher closes the inner's connections to the outer, whose users
then get 503s.

Without root, `ip`, `nft` or `setpriv` the launcher refuses to start; `--unconfined` serves
in process instead, with an ALARM line at start, and the handshake tells the outer (its
metric `uplimit_inner_confined` is 0). The confined child claims confinement at the handshake
only after checking that it runs as a non-root user with no capabilities; the claim is the
inner's own (docs/security.md).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uplimit
from uplimit.config import Config, link_secret_path
from uplimit.inner.serve import budgets_for, ledger_location
from uplimit.link.auth import load_secret
from uplimit.link.confine import (
    Confinement,
    Launch,
    check_access,
    give,
    kernel_quota_bytes,
    places,
    require_confinable,
    serve,
    unprivileged,
)
from uplimit.link.kernel import KernelMeter
from uplimit.link.ledger import open_served
from uplimit.models.loading import resolve

__all__ = ["DEFAULT_METER", "UNCONFINED_ALARM", "run_confined"]

UNCONFINED_ALARM = (
    "ALARM unconfined: the inner side serves without its network namespace, kernel quota,"
    " unprivileged user or charge-only ledger (--unconfined): a compromised inner can write"
    " around the ledger"
)
DEFAULT_METER = "inner"


# -- the files the inner writes ----------------------------------------------------------------


def _written(config: Config) -> dict[str, tuple[str, str]]:
    """Environment variable -> (configured value, default name) for each file the inner
    writes; the gauge's only when rotation is on."""
    c = config
    keys = {
        "UPLIMIT_INNER_AUDIT": (c.inner.audit, "audit.db"),
        "UPLIMIT_LINK_DOWNLINK_LOG": (c.link.downlink_log, "downlink.jsonl"),
        "UPLIMIT_INNER_RECEIVED_MODELS": (c.inner.received_models, "received"),
        "UPLIMIT_INNER_ROLLOUT_RECORD": (c.inner.rollout_record, "rollout-inner.json"),
    }
    if c.gauge.period_s > 0:
        keys["UPLIMIT_GAUGE_DIRECTORY"] = (c.gauge.directory, "gauged")
        keys["UPLIMIT_GAUGE_AUDIT"] = (c.gauge.audit, "gauge-audit.jsonl")
    return keys


# Received models and gauge copies are directories of their own; the rest are files.
_DIRECTORIES = frozenset({"UPLIMIT_INNER_RECEIVED_MODELS", "UPLIMIT_GAUGE_DIRECTORY"})


# -- checks, by probing as the user ------------------------------------------------------------


def _check_access(config: Config, config_path: Path | None, user: tuple[int, int]) -> None:
    ledger = ledger_location(config)
    protected = [Path(uplimit.__file__).parent, Path(sys.prefix)]
    if not ledger.startswith(("postgresql://", "postgres://")):
        protected += [Path(ledger).parent, *Path(ledger).parent.glob(Path(ledger).name + "*")]
    readable = []
    for model in (resolve(config.models.strong), resolve(config.models.weak)):
        readable += [model, *(model.iterdir() if model.is_dir() else [])]
    readable += [config_path] if config_path is not None else []
    check_access(user, "inner", unwritable=protected, readable=readable)


# -- the launcher ------------------------------------------------------------------------------


def run_confined(
    config: Config,
    config_path: Path | None,
    *,
    host: str | None = None,
    on_launch: Callable[[Launch], None] | None = None,
) -> Coroutine[Any, Any, int]:
    """Check and prepare everything now (raising `ConfigError` if the inner cannot be
    confined), then return the coroutine that runs the confined inner until it exits and
    gives its exit status (module doc)."""
    require_confinable("the inner side")
    account = unprivileged(config.inner.user, "inner.user")
    user = (account.pw_uid, account.pw_gid)
    where = ledger_location(config)
    budgets = budgets_for(config)
    env, dirs = places(config.path("", "inner"), _written(config), _DIRECTORIES)
    _check_access(config, config_path, user)
    give(dirs, where, user, "inner")
    secret = load_secret(link_secret_path(config))
    meter = KernelMeter(config.outer.kernel_meter or DEFAULT_METER,
                        kernel_quota_bytes(budgets.lifetime_bytes))  # fmt: skip
    argv = ["serve", "inner", "--host", meter.outer_address]
    argv += ["--config", str(config_path)] if config_path is not None else []
    link = config.link
    return serve(
        Confinement(
            "inner", meter, open_served(where, budgets), account, argv,
            upstream=(host or link.host, (link.downlink_port, link.uplink_port)),
            env=env, secrets={"UPLIMIT_LINK_SECRET_FILE": secret},
        ),
        on_launch,
    )  # fmt: skip
