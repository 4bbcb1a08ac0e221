"""`uplimit meters|budget|audit|link-secret`: the meters side by side, the ledger, the audit
store, the link's shared secret."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from uplimit.cli.common import (
    CONFIG_HELP,
    app,
    console,
)
from uplimit.errors import ConfigError


@app.command(rich_help_panel="Operate")
def meters(
    config: list[Path] | None = typer.Option(
        None,
        help="The served system's config: its ledger, receive counter and kernel meter"
        " ([outer] kernel_meter), unless given below. Repeat it for each link of a deployment"
        " with a relay (docs/tiers.md): the relay's config, then the outer's.",
    ),
    ledger: str | None = typer.Option(None, help="Inner ledger: SQLite file or PostgreSQL URL."),
    budget: str | None = typer.Option(None, help="Budget name [SQLite: link, PostgreSQL: global]."),
    received: Path | None = typer.Option(None, help="The outer's receive-counter file."),
    counter: str = typer.Option("uplink", help="Count name in the receive-counter file."),
    kernel: str | None = typer.Option(None, help="Kernel meter name (namespace uplimit-NAME)."),
    slack: int = typer.Option(0, help="Bytes of disagreement to accept (TCP retransmissions)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Ledger, outer count and kernel count side by side; exit 1 if they disagree.

    Overhead (IP/TCP headers; ACKs the inner sends for downlink traffic) is shown apart.
    With several --config, one link each: JSON is then a list, each with its "config".
    """
    import json

    from uplimit.link.agreement import as_json, checks, figures, read_meters

    configs = config or []
    if len(configs) > 1 and (ledger or received or kernel):
        raise ConfigError("--ledger, --received and --kernel name one link: give one --config")
    links = []
    for path in configs or [None]:
        book, count, meter = ledger, received, kernel
        if path is not None:
            from uplimit.config import load_config
            from uplimit.inner.serve import ledger_location

            cfg = load_config(path)
            book = ledger or ledger_location(cfg)
            count = received or cfg.path(cfg.link.receive_counter, "received.db")
            meter = kernel or cfg.outer.kernel_meter or None
        readings = read_meters(
            ledger=book, budget=budget, received=count, counter=counter, kernel=meter
        )
        links.append((path, readings, checks(readings, slack)))
    if json_out:
        found = [{"config": str(p), **as_json(r, c)} for p, r, c in links]
        print(json.dumps(found if len(links) > 1 else as_json(*links[0][1:]), indent=2))
    else:
        for path, readings, found in links:
            title = "uplimit meters" + (f" ({path})" if len(links) > 1 else "")
            table = Table("meter", "bytes", "", title=title)
            for row in figures(readings):
                table.add_row(*row)
            Console().print(table)
            for c in found:
                mark = "[green]agree[/green]" if c.ok else "[red]DISAGREE[/red]"
                Console().print(f"{mark}  {c.name}: {c.detail}")
    if not all(c.ok for _, _, found in links for c in found):
        raise typer.Exit(1)


RELAY_SECRET_HELP = "The relay's link to the outer instead: [relay] secret_file (docs/tiers.md)."
RELAY_LEDGER_HELP = "The relay's ledger instead: [relay] ledger and budgets (docs/tiers.md)."


@app.command("link-secret", rich_help_panel="Operate")
def link_secret(
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    relay: bool = typer.Option(False, "--relay", help=RELAY_SECRET_HELP),
) -> None:
    """Create the link's shared secret, [link] secret_file (0600; never overwrites one).

    Copy the file to the other side over a channel you trust: both sides prove they hold it
    before the outer takes an inner (docs/link.md)."""
    from uplimit.config import link_secret_path, load_config, relay_secret_path
    from uplimit.link.auth import create_secret

    cfg = load_config(config)
    path = create_secret(relay_secret_path(cfg) if relay else link_secret_path(cfg))
    console.print(f"link secret written to {path} (0600): copy it to the other side")


audit_app = typer.Typer(help="Query the inner side's audit store.", no_args_is_help=True)
app.add_typer(audit_app, name="audit", rich_help_panel="Operate")


def _open_audit(config: Path | None, db: Path | None):
    from uplimit.config import load_config
    from uplimit.inner.audit import AuditStore

    cfg = load_config(config)
    return AuditStore(db or cfg.path(cfg.inner.audit, "audit.db"))


@audit_app.command("list")
def audit_list(
    last: int = typer.Option(20, help="How many records."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    db: Path | None = typer.Option(None, help="Audit store file [inner.audit]."),
) -> None:
    """The latest generations: chosen and discarded candidates, retrievals."""
    import datetime

    store = _open_audit(config, db)
    table = Table("when", "request", "stream", "cand.", "chosen", "tokens", "uploaded",
                  "withheld", "finish", "bits")  # fmt: skip
    for r in store.query(last=last):
        when = datetime.datetime.fromtimestamp(r.t_received).strftime("%m-%d %H:%M:%S")
        bits = "" if r.bits_uploaded is None else f"{r.bits_uploaded:.0f}"
        table.add_row(when, r.request_id, str(r.stream_id), str(r.candidate),
                      "yes" if r.chosen else "", str(len(r.tokens)), str(len(r.uploaded)),
                      str(len(r.withheld)), r.finish_reason, bits)  # fmt: skip
    store.close()
    Console().print(table)


@audit_app.command("show")
def audit_show(
    request_id: str = typer.Argument(..., help="A request id (or a withheld id with --withheld)."),
    withheld: bool = typer.Option(False, help="Look up a withheld-reasoning id instead."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    db: Path | None = typer.Option(None, help="Audit store file [inner.audit]."),
) -> None:
    """Every record of one request, as JSON: seeds, tokens, texts, withheld reasoning, timings."""
    import dataclasses
    import json

    store = _open_audit(config, db)
    found = store.query(withheld_id=request_id) if withheld else store.query(request_id=request_id)
    store.close()
    if not found:
        console.print(f"no records for {request_id!r}")
        raise typer.Exit(1)
    print(json.dumps([dataclasses.asdict(r) for r in found], indent=1))


budget_app = typer.Typer(
    help="Create the uplink ledger (init), read it, raise its budget (audited)."
)
app.add_typer(budget_app, name="budget", rich_help_panel="Operate")


@budget_app.command("init")
def budget_init(
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    ledger: str | None = typer.Option(None, help="Ledger: SQLite path or URL [link.ledger]."),
    relay: bool = typer.Option(False, "--relay", help=RELAY_LEDGER_HELP),
) -> None:
    """Create the ledger with the configured budgets, its creation time and a random id.

    The only way a ledger comes to exist: serving refuses a missing one, so a deleted ledger
    cannot come back empty. Refuses a ledger that is already initialised."""
    from uplimit.config import load_config
    from uplimit.inner.serve import budgets_for, ledger_location
    from uplimit.link.ledger import init_ledger
    from uplimit.relay.serve import relay_budgets, relay_ledger_location

    cfg = load_config(config)
    if relay:
        state = init_ledger(ledger or relay_ledger_location(cfg), relay_budgets(cfg))
    else:
        state = init_ledger(ledger or ledger_location(cfg), budgets_for(cfg))
    console.print(
        f"ledger {state.ledger_id} initialised: budget {state.name!r},"
        f" lifetime {state.budgets.lifetime_bytes:,} bytes, per day"
        f" {state.budgets.per_day_bytes}, per second {state.budgets.per_second_bytes}"
    )


@budget_app.command("grant")
def budget_grant(
    ledger: str = typer.Option(..., help="The PostgreSQL ledger's URL, as its owner."),
    role: str = typer.Option(..., help="The inner host's database role."),
    budget: str = typer.Option("global", help="An initialised budget in that database."),
) -> None:
    """PostgreSQL: let ROLE charge and read the budgets, and nothing else (no raise, no lower
    usage, no latch cleared: a trigger refuses them to anyone but the owner)."""
    from uplimit.link.ledger import PostgresLedger

    if not ledger.startswith(("postgresql://", "postgres://")):
        raise ConfigError("budget grant is for a PostgreSQL ledger (a SQLite file has no roles)")
    book = PostgresLedger(ledger, name=budget)
    try:
        book.grant_charger(role)
    finally:
        book.close()
    console.print(f"{role} may charge the budgets of this database, and nothing else")


@budget_app.command("show")
def budget_show(
    ledger: str = typer.Option(..., help="Ledger: SQLite path or postgresql:// URL."),
) -> None:
    """Budgets, bytes charged, whether the ledger is latched shut, and past raises."""
    from uplimit.link.ledger import open_ledger

    book = open_ledger(ledger)
    try:
        state, changes = book.usage(), book.budget_changes()
    finally:
        book.close()
    b = state.budgets
    table = Table("measure", "value", title=f"ledger {state.name}")
    table.add_row(
        "lifetime budget / charged", f"{b.lifetime_bytes:,} / {state.usage.lifetime_bytes:,}"
    )
    table.add_row("of which wire / timing", f"{state.wire_bytes:,} / {state.timing_bytes:,}")
    table.add_row("per-day / per-second budget", f"{b.per_day_bytes} / {b.per_second_bytes}")
    table.add_row("ledger id", state.ledger_id)
    table.add_row("latched shut by", str(state.exhausted_by.value if state.exhausted_by else "-"))
    table.add_row("budget changes", str(len(changes)))
    Console().print(table)


@budget_app.command("raise")
def budget_raise(
    ledger: str = typer.Option(..., help="Ledger: SQLite path or postgresql:// URL."),
    lifetime: int = typer.Option(..., help="New lifetime budget in bytes."),
    per_day: int | None = typer.Option(None, help="New per-day budget in bytes (none: no limit)."),
    per_second: int | None = typer.Option(None, help="New per-second budget in bytes."),
    who: str = typer.Option(..., help="The operator taking this action."),
    reason: str = typer.Option(..., help="Why; kept in the ledger's audit table."),
) -> None:
    """Set new budgets and clear the exhausted latch; recorded with who, when and why."""
    from uplimit.link.budget import Budgets
    from uplimit.link.ledger import open_ledger

    book = open_ledger(ledger)
    try:
        change = book.raise_budget(Budgets(lifetime, per_day, per_second), who=who, reason=reason)
    finally:
        book.close()
    console.print(f"budget changed: {change}")
