"""`uplimit serve inner|outer|both|relay|verifier`, `rollout`, `demo`: the running system."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from uplimit.cli.common import CONFIG_HELP, app, console, load_service_models, progress_bar
from uplimit.errors import UplimitError

serve_app = typer.Typer(
    help="Run the inner side, the outer side, or both (docs/serving.md).", no_args_is_help=True
)
app.add_typer(serve_app, name="serve", rich_help_panel="Serve")


UNCONFINED_HELP = (
    "Serve the inner side without its network namespace, kernel quota, unprivileged user and"
    " charge-only ledger (an ALARM; the outer shows uplimit_inner_confined 0)."
)


def _inner(config: Path | None, cfg, host: str | None, unconfined: bool):
    """The inner side's coroutine: confined (as root, `inner.confine`), or in this process
    when `unconfined` (loading its models here first)."""
    import logging

    from uplimit.inner.confine import UNCONFINED_ALARM, run_confined
    from uplimit.inner.serve import serve_inner
    from uplimit.link.confine import Launch

    if not unconfined:

        def launched(launch: Launch) -> None:
            console.print(
                f"inner: confined in namespace uplimit-{launch.meter} (quota"
                f" {launch.quota_bytes:,} bytes) as {launch.user}"
            )

        return run_confined(cfg, config, host=host, on_launch=launched)
    logging.getLogger("uplimit.inner").error("%s", UNCONFINED_ALARM)
    models = load_service_models(cfg, ("strong", "weak"))
    return serve_inner(cfg, models["strong"], models["weak"], host=host, confined=False)


@serve_app.command("inner")
def serve_inner_cmd(
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    host: str | None = typer.Option(None, help="The outer's link address [link.host]."),
    unconfined: bool = typer.Option(False, "--unconfined", help=UNCONFINED_HELP),
    charge_socket: Path | None = typer.Option(None, hidden=True),  # the confined child's
) -> None:
    """The inner side: strong model, encoder, ledger, audit store; connects to the outer.

    As root it confines itself: its own network namespace behind the kernel quota, an
    unprivileged user, no capabilities, charge-only access to the ledger (docs/security.md).
    Elsewhere it refuses to start unless --unconfined is given."""
    import asyncio

    from uplimit.config import load_config
    from uplimit.link.confine import require_confinable
    from uplimit.models.active import with_active_weak
    from uplimit.wire.protocol import EndReason

    if charge_socket is None and not unconfined:
        require_confinable("the inner side")  # before anything else touches a file
    cfg = with_active_weak(load_config(config), "inner")
    console.print(f"inner: connecting to {host or cfg.link.host}:{cfg.link.downlink_port}")
    if charge_socket is None:
        result = asyncio.run(_inner(config, cfg, host, unconfined))
        if not isinstance(result, EndReason):  # the confined child's exit status
            raise typer.Exit(result)
        console.print(f"inner: link ended ({result.name.lower()})")
        return
    from uplimit.inner.serve import serve_inner
    from uplimit.link.charge_service import ChargeClient
    from uplimit.link.confine import check_confined

    check_confined("inner")
    ledger = ChargeClient(charge_socket)
    models = load_service_models(cfg, ("strong", "weak"))
    reason = asyncio.run(serve_inner(cfg, models["strong"], models["weak"], host=host,
                                     ledger=ledger, confined=True))  # fmt: skip
    console.print(f"inner: link ended ({reason.name.lower()})")


@serve_app.command("outer")
def serve_outer_cmd(
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
) -> None:
    """The outer side: OpenAI-compatible API, decoder; listens for the inner."""
    import asyncio

    from uplimit.config import load_config
    from uplimit.models.active import with_active_weak
    from uplimit.outer.serve import serve_outer

    cfg = with_active_weak(load_config(config), "outer")
    weak = load_service_models(cfg, ("weak",))["weak"]

    def listening() -> None:
        console.print(f"outer: API on http://{cfg.outer.host}:{cfg.outer.port}/v1")

    asyncio.run(serve_outer(cfg, weak, on_listening=listening))


@serve_app.command("both")
def serve_both_cmd(
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    unconfined: bool = typer.Option(False, "--unconfined", help=UNCONFINED_HELP),
) -> None:
    """Both sides, joined by the real (metered) link: the outer in this process, the inner
    confined as `serve inner` is (or in this process too with --unconfined)."""
    import asyncio

    from uplimit.both import serve_both
    from uplimit.config import load_config
    from uplimit.link.confine import require_confinable
    from uplimit.models.active import with_active_weak

    if not unconfined:
        require_confinable("the inner side")  # before anything else touches a file
    cfg = load_config(config)
    inner_cfg, outer_cfg = with_active_weak(cfg, "inner"), with_active_weak(cfg, "outer")
    run_inner = _inner(config, inner_cfg, None, unconfined)
    outer_weak = load_service_models(outer_cfg, ("weak",))["weak"]  # the outer's own copy

    def listening() -> None:
        console.print(f"API on http://{cfg.outer.host}:{cfg.outer.port}/v1")

    asyncio.run(serve_both(run_inner, outer_cfg, outer_weak, on_listening=listening))


RELAY_UNCONFINED_HELP = (
    "Serve the relay without its network namespace, kernel quota, unprivileged user and"
    " charge-only ledger (an ALARM; the outer shows uplimit_inner_confined 0)."
)


@serve_app.command("relay")
def serve_relay_cmd(
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    unconfined: bool = typer.Option(False, "--unconfined", help=RELAY_UNCONFINED_HELP),
    charge_socket: Path | None = typer.Option(None, hidden=True),  # the confined child's
) -> None:
    """The intermediate tier (docs/tiers.md), re-coding the outer's streams with the weak model.

    Towards the inner it is an outer (the link and outer sections: its own users' API, whose
    text stays here); towards the outer it is an inner (the relay section: its own ledger,
    budgets and ticks). As root it confines itself as the inner does, its link to the outer
    behind its own kernel quota (relay.confine); elsewhere it refuses to start unless
    --unconfined is given."""
    import asyncio
    import logging

    from uplimit.config import load_config
    from uplimit.link.charge_service import ChargeClient
    from uplimit.link.confine import Launch, check_confined, require_confinable
    from uplimit.relay.confine import UNCONFINED_ALARM, run_confined
    from uplimit.relay.serve import serve_relay

    if charge_socket is None and not unconfined:
        require_confinable("the relay")  # before anything else touches a file
    cfg = load_config(config)
    if charge_socket is None and not unconfined:

        def launched(launch: Launch) -> None:
            console.print(
                f"relay: confined in namespace uplimit-{launch.meter} (quota"
                f" {launch.quota_bytes:,} bytes) as {launch.user}; API on"
                f" http://{cfg.outer.host}:{cfg.outer.port}/v1"
            )

        raise typer.Exit(asyncio.run(run_confined(cfg, config, on_launch=launched)))
    if charge_socket is None:
        logging.getLogger("uplimit.relay").error("%s", UNCONFINED_ALARM)
    else:
        check_confined("relay")
    weak = load_service_models(cfg, ("weak",))["weak"]

    def listening() -> None:
        console.print(f"relay: API on http://{cfg.outer.host}:{cfg.outer.port}/v1")

    ledger = ChargeClient(charge_socket) if charge_socket is not None else None
    asyncio.run(serve_relay(cfg, weak, on_listening=listening, ledger=ledger,
                            confined=charge_socket is not None))  # fmt: skip


@serve_app.command("verifier")
def serve_verifier_cmd(
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
) -> None:
    """The spot-check verifier (inner side, docs/security.md).

    Its own strong model re-runs the streams the outer sends it; each verdict is recorded."""
    import asyncio
    import logging

    from uplimit.config import load_config
    from uplimit.inner.verifier import serve_verifier
    from uplimit.models.active import with_active_weak
    from uplimit.wire.checks import check_reproducible

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # The drafter is the weak model the inner started with: after a rollout, its record's.
    cfg = with_active_weak(load_config(config), "inner")
    check_reproducible(cfg)  # before minutes of loading
    roles = ("strong", "weak")  # weak: the drafter, and compression-aware decoding's guide
    models = load_service_models(cfg, roles)

    def listening(port: int) -> None:
        console.print(f"verifier: listening on {cfg.verifier.host}:{port}")

    asyncio.run(serve_verifier(cfg, models["strong"], models.get("weak"), on_listening=listening))


@app.command(rich_help_panel="Serve")
def rollout(
    weak: Path = typer.Option(..., help="The new weak model (a GGUF file on the outer's host)."),
    calibration: Path = typer.Option(..., help="Its calibration JSON (uplimit calibrate)."),
    url: list[str] = typer.Option(
        ["http://127.0.0.1:8000"],
        help="A tier's API, top first: the outer's, then (three tiers) the relay's. The rollout"
        " starts at the first and is followed down the others (docs/tiers.md).",
    ),
    admin_key: list[str] = typer.Option(
        ...,
        envvar="UPLIMIT_ADMIN_KEY",
        help="The admin key (outer.admin_key): one for every --url, or one per --url.",
    ),
    follow: bool = typer.Option(True, help="Show progress until the switch (or failure)."),
) -> None:
    """Switch a running deployment to a new weak model (docs/distill.md).

    The outer sends it down (not budgeted), then both ends of its link code new streams with
    it; running streams finish on the old one. Through a relay, the relay passes it on down
    its link to the inner once its own uplink switched; each --url's state is shown."""
    import time

    import httpx

    if len(admin_key) not in (1, len(url)):
        raise typer.BadParameter("one, or one per --url", param_hint="--admin-key")
    keys = admin_key * len(url) if len(admin_key) == 1 else admin_key
    tiers = [
        (f"{u.rstrip('/')}/admin/rollout", {"authorization": f"Bearer {k}"})
        for u, k in zip(url, keys, strict=True)
    ]

    def get(tier: int) -> dict:
        endpoint, headers = tiers[tier]
        try:
            return httpx.get(endpoint, headers=headers, timeout=30).raise_for_status().json()
        except httpx.HTTPError as e:
            raise UplimitError(
                f"{url[tier]}: {e} (a tier that refused the rollout ended its link: see its log)"
            ) from e

    endpoint, headers = tiers[0]
    body = {"weak": str(weak.resolve()), "calibration": str(calibration.resolve())}
    r = httpx.post(endpoint, json=body, headers=headers, timeout=30)
    if r.status_code != 202:
        raise UplimitError(f"the outer refused the rollout ({r.status_code}): {r.text}")
    status = r.json()
    if not follow:
        console.print(f"{url[0]}: {status['state']} {status['weak']}")
        return
    for tier in range(len(tiers)):
        if tier > 0:  # the tier above switched to `sha`; this one shows it once it receives it
            sha, status = status["sha256"], get(tier)
        with progress_bar() as update:
            while status["state"] in ("checking", "receiving", "sending") or (
                tier > 0 and status["sha256"] != sha
            ):
                if status["total_bytes"] and (tier == 0 or status["sha256"] == sha):
                    what = "received" if status["state"] == "receiving" else "sent down"
                    update(f"{url[tier]}: {what}", status["sent_bytes"], status["total_bytes"])
                time.sleep(1.0)
                status = get(tier)
        if status["state"] == "failed":
            raise UplimitError(f"rollout failed at {url[tier]}: {status['error']}")
        done = f"{status['state']} to {status['weak']} (sha256 {status['sha256'][:16]})"
        console.print(f"{url[tier]}: {done}")


@app.command(rich_help_panel="Serve")
def demo(
    max_tokens: int = typer.Option(96, help="Tokens per answer at most."),
    clients: int = typer.Option(32, help="Then this many clients at once (0: skip)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the figures here."),
    tiers: int = typer.Option(
        2, help="3: inner, relay and outer (docs/tiers.md); a researcher asks on the relay."
    ),
) -> None:
    """Serve a few prompts through the real inner/outer processes; show every uploaded bit.

    Starts both sides on loopback (the inner behind the kernel quota in its own network
    namespace when root), asks through the official `openai` client at T=0 and T=0.7, and
    prints each answer with its uploaded bits and what gzip would need; then many clients ask
    at once, for the figure at scale (`make demo`). With --tiers 3 a relay sits between them:
    one researcher's question on the relay, the users' at the outer, and each link's figures
    (--clients does not apply).
    """
    if clients < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--clients")
    if tiers not in (2, 3):
        raise typer.BadParameter("2 or 3", param_hint="--tiers")
    if tiers == 3:
        from uplimit.demo_tiers import run_tiers_demo

        run_tiers_demo(Console(), max_tokens=max_tokens, json_out=json_out)
        return
    from uplimit.demo import run_service_demo

    run_service_demo(Console(), max_tokens=max_tokens, clients=clients, json_out=json_out)
