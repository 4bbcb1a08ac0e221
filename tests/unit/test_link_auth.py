"""The link's shared secret and proofs (`link.auth`): strict, fail closed."""

from __future__ import annotations

import os

import pytest

from uplimit.errors import ConfigError
from uplimit.link.auth import (
    PROOF_BYTES,
    SECRET_BYTES,
    allowed_addresses,
    create_secret,
    inner_proof,
    load_secret,
    new_nonce,
    outer_proof,
    proof_matches,
)


def test_a_created_secret_is_owner_only_random_and_never_overwritten(tmp_path) -> None:
    a, b = create_secret(tmp_path / "a"), create_secret(tmp_path / "sub" / "b")
    assert a.stat().st_mode & 0o777 == 0o600
    assert len(load_secret(a)) == SECRET_BYTES and load_secret(a) != load_secret(b)
    with pytest.raises(ConfigError, match="not overwriting"):
        create_secret(a)


def test_a_missing_short_or_shared_secret_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="uplimit link-secret"):
        load_secret(tmp_path / "missing")
    short = tmp_path / "short"
    short.write_bytes(bytes(SECRET_BYTES - 1))
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="needs 32"):
        load_secret(short)
    shared = create_secret(tmp_path / "shared")
    shared.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_secret(shared)
    link = tmp_path / "link"
    os.symlink(create_secret(tmp_path / "target"), link)
    with pytest.raises(ConfigError):  # a link could point anywhere: not followed
        load_secret(link)


def test_proofs_depend_on_the_secret_both_nonces_and_the_side() -> None:
    secret, n_o, n_i = bytes(range(32)), new_nonce(), new_nonce()
    proof = inner_proof(secret, n_o, n_i)
    assert len(proof) == PROOF_BYTES and proof_matches(proof, inner_proof(secret, n_o, n_i))
    for other in (
        inner_proof(bytes(32), n_o, n_i),
        inner_proof(secret, new_nonce(), n_i),
        inner_proof(secret, n_o, new_nonce()),
        outer_proof(secret, n_o, n_i),  # one side's proof never serves as the other's
    ):
        assert not proof_matches(proof, other)
    with pytest.raises(ConfigError):
        inner_proof(secret, n_o[:-1], n_i)


def test_inner_addresses_are_parsed_strictly_and_canonically() -> None:
    assert allowed_addresses("127.0.0.1, ::1,0:0::1") == {"127.0.0.1", "::1"}
    for bad in ("", "localhost", "10.0.0.0/8", "127.0.0.1,"):
        with pytest.raises(ConfigError):
            allowed_addresses(bad)


def test_the_link_secret_command_writes_the_configured_file_once(tmp_path) -> None:
    from typer.testing import CliRunner

    from uplimit.cli import app

    config = tmp_path / "uplimit.toml"
    config.write_text(f'[link]\nsecret_file = "{tmp_path / "link.secret"}"\n')
    runner = CliRunner()
    out = runner.invoke(app, ["link-secret", "--config", str(config)])
    assert out.exit_code == 0, out.output
    assert len(load_secret(tmp_path / "link.secret")) == SECRET_BYTES
    again = runner.invoke(app, ["link-secret", "--config", str(config)])
    assert again.exit_code != 0 and "not overwriting" in str(again.exception)  # main() prints it
