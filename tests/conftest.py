"""Fixtures shared by all tests.

Model fixtures import torch lazily, so tests that need no model do not pay for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

from support.net import free_port

if TYPE_CHECKING:
    from uplimit.models.hf import HFModel


# Prerequisites a test may find missing. `make test` names the ones it installed in
# UPLIMIT_REQUIRE (all as root), and there a missing one fails instead of skipping.
PREREQUISITES = frozenset({"real", "kernel", "postgres", "browser", "promtool", "faketime"})
REQUIRED = frozenset(filter(None, os.environ.get("UPLIMIT_REQUIRE", "").split(",")))
if not REQUIRED <= PREREQUISITES:
    raise pytest.UsageError(f"UPLIMIT_REQUIRE: unknown {sorted(REQUIRED - PREREQUISITES)}")


def unavailable(what: str, reason: str) -> NoReturn:
    """Prerequisite `what` is missing: skip, saying why, unless UPLIMIT_REQUIRE demands it."""
    assert what in PREREQUISITES, what
    if what in REQUIRED:
        pytest.fail(f"{reason} (UPLIMIT_REQUIRE demands {what!r})", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def missing() -> Callable[[str, str], NoReturn]:
    """`unavailable` for test modules, which cannot import the root conftest."""
    return unavailable


@pytest.fixture(scope="session")
def tiny_pair_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(strong_dir, weak_dir) of the tiny test pair, built once per run (well under a second)."""
    import torch

    from uplimit.models.tiny import build_tiny_pair

    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    # spin-waiting made each step ~50x slower (55 ms instead of 1 ms).
    torch.set_num_threads(1)
    return build_tiny_pair(tmp_path_factory.mktemp("tiny-pair"))


@pytest.fixture(scope="session")
def tiny_strong(tiny_pair_dirs: tuple[Path, Path]) -> Iterator[HFModel]:
    from uplimit.models.hf import HFModel

    model = HFModel(tiny_pair_dirs[0])
    yield model
    model.close()


@pytest.fixture(scope="session")
def tiny_weak(tiny_pair_dirs: tuple[Path, Path]) -> Iterator[HFModel]:
    from uplimit.models.hf import HFModel

    model = HFModel(tiny_pair_dirs[1])
    yield model
    model.close()


@pytest.fixture(scope="session")
def reference(tiny_strong: HFModel) -> tuple[list[int], list[int], list[bytes]]:
    """This process's logits of the tiny strong model along support.hf's fixed text."""
    from support.hf import CONTINUATION, PROMPT, logits_trace

    prompt, forced = tiny_strong.tokenize(PROMPT), tiny_strong.tokenize(CONTINUATION)
    with tiny_strong.session(max_sequences=1, max_context=256) as session:
        return prompt, forced, logits_trace(session, prompt, forced)


@pytest.fixture
def tiny_services_config(tiny_pair_dirs: tuple[Path, Path], tmp_path: Path):
    """`make(outer={}, env=None, ledger=True)`: the `Config` of `serve_outer` + `serve_inner`
    on the tiny pair, with free ports, a 1 MB lifetime budget (its ledger initialised unless
    `ledger` is false: an outer alone has none on its host), files under tmp_path, `outer`'s
    keys added to its [outer] section and `env` as the environment it is loaded with."""
    from support.config import init_ledger_for, link_files, tiny_models, write_config

    def make(
        outer: Mapping[str, object] | None = None,
        env: Mapping[str, str] | None = None,
        *,
        ledger: bool = True,
    ):
        config = write_config(
            tmp_path / "uplimit.toml",
            {
                "models": tiny_models(tiny_pair_dirs),
                "coding": {"frame_tokens": 4, "max_streams": 8, "max_context": 256},
                "link": {
                    "downlink_port": free_port(),
                    "uplink_port": free_port(),
                    "tick_s": 0.02,
                    "lifetime_budget_bytes": 1_000_000,
                    **link_files(tmp_path),
                },
                "inner": {"max_batch": 4, "audit": tmp_path / "audit.db"},
                "outer": {"model_name": "tiny", **(outer or {})},
            },
            env,
        )
        if ledger:
            init_ledger_for(config)
        return config

    return make


# --- link layer: ledger backends, a throwaway PostgreSQL server, the kernel meter -----------
# Self-contained: imports are local so this block can move or go without touching the rest.


def _postgres_bindir() -> Path | None:
    import glob
    import shutil

    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: p.split("/")[4])
    return Path(versions[-1]).parent if versions else None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server (Debian's binaries) on 127.0.0.1 and a random port.

    Runs as user `postgres` when we are root (the server refuses root). fsync is left at its
    default (on), as a ledger requires, and not pinned on the command line so a test can turn
    it off with ALTER SYSTEM. Stopped and deleted at the end of the session.
    """
    import os
    import pwd
    import shutil
    import subprocess
    import tempfile

    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("postgres", "psycopg is not installed (pip install psycopg)")
    bindir = _postgres_bindir()
    if bindir is None:
        unavailable("postgres", "PostgreSQL server binaries not found (Debian: postgresql)")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="uplimit-pg-"))
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            unavailable("postgres", "running as root with no `postgres` user to run the server")
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def pg(tool: str, *args: str) -> None:
        subprocess.run(
            [*as_user, str(bindir / tool), *args], check=True, capture_output=True, timeout=120
        )

    try:
        pg("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"
        pg("pg_ctl", "-D", str(data), "-l", str(root / "log"), "-o", options, "-w", "start")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {e.stderr.decode(errors='replace')}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


class LedgerTarget:
    """Where one test's ledger lives. Each `open` is a new connection: closing one and opening
    another is a restart; opening several is several links (or threads) sharing a budget."""

    def __init__(self, kind: str, where: str, name: str) -> None:
        self.kind, self.where, self.name = kind, where, name
        self._opened: list = []

    def open(self, budgets=None, **kwargs):
        from uplimit.link.ledger import open_ledger

        ledger = open_ledger(self.where, budgets, name=self.name, **kwargs)
        self._opened.append(ledger)
        return ledger

    def close_all(self) -> None:
        for ledger in self._opened:
            ledger.close()


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerTarget]:
    """A fresh budget on SQLite (a file) and on PostgreSQL (a new budget name, same server)."""
    import uuid

    if request.param == "postgres":
        where = request.getfixturevalue("postgres_url")
    else:
        where = str(tmp_path / "ledger.db")
    target = LedgerTarget(request.param, where, f"test-{uuid.uuid4().hex[:12]}")
    yield target
    target.close_all()


@pytest.fixture
def kernel_meter() -> Iterator:
    """factory(quota_bytes) -> a created `KernelMeter` in namespace uplimit-test-<hex>, torn down
    after the test, pass or fail. Skips, saying why, where there is no root or no nft."""
    import uuid

    from uplimit.link.kernel import KernelMeter, available

    can = available()
    if not can.ok:
        unavailable("kernel", f"kernel meter unavailable: {can.reason}")
    made: list[KernelMeter] = []

    def make(quota_bytes: int) -> KernelMeter:
        meter = KernelMeter(f"test-{uuid.uuid4().hex[:5]}", quota_bytes)
        made.append(meter)
        meter.create()
        return meter

    yield make
    for meter in made:
        meter.teardown()
