"""`uplimit keys add|list|revoke`: the API's keys and their limits (`outer.keys`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from uplimit.cli.common import CONFIG_HELP, app

keys_app = typer.Typer(help="API keys with limits: add, list, revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys", rich_help_panel="Operate")


def _file(config: Path | None, file: Path | None) -> Path:
    from uplimit.config import load_config
    from uplimit.errors import ConfigError

    if file is not None:
        return file
    configured = load_config(config).outer.keys_file
    if not configured:
        raise ConfigError("no keys file: pass --file, or set [outer] keys_file")
    return Path(configured).expanduser()


@keys_app.command("add")
def keys_add(
    name: str = typer.Argument(..., help="The key's name (letters, digits, - and _)."),
    bits_per_day: int | None = typer.Option(None, help="Uploaded bits a day (UTC)."),
    streams: int | None = typer.Option(None, help="Streams open at once."),
    per_minute: int | None = typer.Option(None, help="Requests a minute."),
    file: Path | None = typer.Option(None, help="The keys file [outer.keys_file]."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
) -> None:
    """Add a key; prints it once (the file keeps only its sha256)."""
    from uplimit.outer.keys import KeyLimits, add_key

    print(add_key(_file(config, file), name, KeyLimits(bits_per_day, streams, per_minute)))


@keys_app.command("list")
def keys_list(
    file: Path | None = typer.Option(None, help="The keys file [outer.keys_file]."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
) -> None:
    """The keys, their limits and whether they are revoked."""
    from uplimit.outer.keys import load_keys

    table = Table("name", "bits/day", "streams", "per minute", "revoked", title="uplimit keys")
    for k in load_keys(_file(config, file)).values():
        limits = (k.limits.bits_per_day, k.limits.streams, k.limits.per_minute)
        table.add_row(k.name, *("-" if v is None else f"{v:,}" for v in limits), str(k.revoked))
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(
    name: str = typer.Argument(..., help="The key's name."),
    file: Path | None = typer.Option(None, help="The keys file [outer.keys_file]."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
) -> None:
    """Revoke a key (the outer reads the keys file when it starts)."""
    from uplimit.outer.keys import revoke_key

    revoke_key(_file(config, file), name)
