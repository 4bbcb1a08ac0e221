"""The services' TOML configuration, written for a test from sections of plain values."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from uplimit.config import Config, load_config
from uplimit.link.auth import create_secret

__all__ = ["init_ledger_for", "link_files", "tiny_models", "write_config"]


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string (paths, names)


def write_config(
    path: Path,
    sections: Mapping[str, Mapping[str, object]],
    env: Mapping[str, str] | None = None,
) -> Config:
    """Write `sections` as TOML to `path` and load it with `env` as the environment (none by
    default, so the test's own environment cannot change it)."""
    lines = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_value(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return load_config(path, env=dict(env or {}))


def init_ledger_for(config: Config) -> None:
    """`uplimit budget init` for `config`, once: serving refuses a ledger never initialised."""
    from uplimit.inner.serve import budgets_for, ledger_location
    from uplimit.link.ledger import init_ledger

    if not Path(ledger_location(config)).exists():
        init_ledger(ledger_location(config), budgets_for(config))


def tiny_models(pair_dirs: tuple[Path, Path]) -> dict[str, object]:
    """[models] for the tiny Hugging Face pair the tests build."""
    strong, weak = pair_dirs
    return {"strong": str(strong), "weak": str(weak), "backend": "hf"}


def link_files(tmp_path: Path) -> dict[str, object]:
    """[link]'s files (ledger, downlink log, receive counter, the link's secret, created here
    once) inside the test's directory."""
    secret = tmp_path / "link.secret"
    if not secret.exists():
        create_secret(secret)
    return {
        "ledger": str(tmp_path / "ledger.db"),
        "downlink_log": str(tmp_path / "downlink.jsonl"),
        "receive_counter": str(tmp_path / "received.db"),
        "secret_file": str(secret),
    }
