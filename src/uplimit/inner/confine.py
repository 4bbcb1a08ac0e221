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

Without root, `ip`, `nft` or `setpriv` the launcher refuses to start; `--unconfined` serves
in process instead, with an ALARM line at start, and the handshake tells the outer (its
metric `uplimit_inner_confined` is 0). The confined child claims confinement at the handshake
only after checking that it runs as a non-root user with no capabilities; the claim is the
inner's own (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uplimit
from uplimit.config import Config, link_secret_path
from uplimit.errors import ConfigError
from uplimit.inner.serve import budgets_for, ledger_location
from uplimit.link.auth import load_secret
from uplimit.link.charge_service import ChargeService
from uplimit.link.kernel import KernelMeter, available
from uplimit.link.ledger import open_served
from uplimit.models.loading import resolve

__all__ = [
    "UNCONFINED_ALARM",
    "Launch",
    "check_confined",
    "kernel_quota_bytes",
    "require_confinable",
    "run_confined",
]

log = logging.getLogger(__name__)

UNCONFINED_ALARM = (
    "ALARM unconfined: the inner side serves without its network namespace, kernel quota,"
    " unprivileged user or charge-only ledger (--unconfined): a compromised inner can write"
    " around the ledger"
)

# The kernel quota counts IP bytes leaving the namespace. Uplink payload is at most the
# lifetime budget L (every byte is charged first). Each uplink write is one TCP segment with
# 52 bytes of IP and TCP headers (timestamps on); budgeting for writes that carry at least
# MIN_WRITE_BYTES charged bytes on average gives headers <= 52 * L / MIN_WRITE_BYTES. The inner
# also sends ACKs for downlink traffic (52 bytes per ~2 segments): ACK_ALLOWANCE_FACTOR * L of
# them, i.e. about 56 * L bytes of downlink at full-sized segments.
HEADER_BYTES = 52
MIN_WRITE_BYTES = 16
ACK_ALLOWANCE_FACTOR = 1
DEFAULT_METER = "inner"
STOP_TIMEOUT_S = 30.0


def kernel_quota_bytes(lifetime_bytes: int) -> int:
    """L + 52 * ceil(L / 16) + L: payload, headers, ACKs (module constants, docs/security.md)."""
    headers = HEADER_BYTES * -(-lifetime_bytes // MIN_WRITE_BYTES)
    return lifetime_bytes + headers + ACK_ALLOWANCE_FACTOR * lifetime_bytes


def require_confinable() -> None:
    """Raise `ConfigError` unless this process can confine an inner (root, ip, nft, setpriv)."""
    can = available()
    if not can.ok:
        raise ConfigError(
            f"cannot confine the inner side: {can.reason}; `--unconfined` serves without"
            " confinement (an ALARM)"
        )


def check_confined() -> None:
    """Before a child claims confinement: it must run as a non-root user with no capabilities."""
    if os.geteuid() == 0:
        raise ConfigError("--charge-socket is the confined inner's: it must not run as root")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("CapEff:", "CapPrm:", "CapBnd:")) and int(line.split()[1], 16):
            raise ConfigError(f"the confined inner still has capabilities ({line})")


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


def _writable_dirs(config: Config) -> tuple[dict[str, str], list[Path]]:
    """(environment for the child, directories the user must own): unset keys go under
    $UPLIMIT_HOME/inner/; received models are a directory of their own."""
    env, dirs = {}, []
    state = config.path("", "inner")
    for var, (value, name) in _written(config).items():
        path = Path(value).expanduser() if value else state / name
        env[var] = str(path)
        dirs.append(path if var in ("UPLIMIT_INNER_RECEIVED_MODELS", "UPLIMIT_GAUGE_DIRECTORY")
                    else path.parent)  # fmt: skip
    return env, dirs


# -- checks, by probing as the user ------------------------------------------------------------


def _as_user(uid: int, gid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]


def _probe(user: tuple[int, int], test: str, path: Path) -> bool:
    done = subprocess.run([*_as_user(*user), "test", test, str(path)], timeout=30, check=False)
    return done.returncode == 0


def _check_runnable(user: tuple[int, int]) -> None:
    """The user must be able to run this interpreter and import this very code: a checkout
    under a directory it cannot enter (e.g. a 0700 one, as `mktemp -d` makes) fails here, with
    a message, rather than inside the namespace (an ImportError, or another copy imported)."""
    ours = str(Path(uplimit.__file__).resolve())
    where = "import pathlib, uplimit.cli; print(pathlib.Path(uplimit.__file__).resolve())"
    argv = [*_as_user(*user), sys.executable, "-c", where]
    done = subprocess.run(argv, timeout=60, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    elif (theirs := done.stdout.strip()) != ours:
        why = f"it imports {theirs}"
    else:
        return
    raise ConfigError(
        f"the inner's user cannot run {sys.executable} with {ours} ({why}): it must be able to"
        " read the code and the virtualenv, and to enter every directory above them"
    )


def _check_access(config: Config, config_path: Path | None, user: tuple[int, int]) -> None:
    _check_runnable(user)
    ledger = ledger_location(config)
    protected = [Path(uplimit.__file__).parent, Path(sys.prefix)]
    if not ledger.startswith(("postgresql://", "postgres://")):
        protected += [Path(ledger).parent, *Path(ledger).parent.glob(Path(ledger).name + "*")]
    for path in protected:
        if _probe(user, "-w", path):
            raise ConfigError(f"the inner's user can write {path}: it must not (docs/security.md)")
    readable = []
    for model in (resolve(config.models.strong), resolve(config.models.weak)):
        readable += [model, *(model.iterdir() if model.is_dir() else [])]
    readable += [config_path] if config_path is not None else []
    for path in readable:
        if not _probe(user, "-r", path):
            raise ConfigError(f"the inner's user cannot read {path}")


def _give(dirs: list[Path], ledger: str, user: tuple[int, int]) -> None:
    """Make the inner's directories the user's; never the ledger's."""
    if not ledger.startswith(("postgresql://", "postgres://")):
        ledger_dir = Path(ledger).resolve().parent
        for d in dirs:
            if d.resolve() == ledger_dir:
                raise ConfigError(
                    f"{d} holds the ledger: the confined inner must not write there; point the"
                    " inner's files elsewhere (or leave their keys unset)"
                )
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, *user)


# -- the relay -------------------------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _relay(listen: str, target: str, ports: list[int]) -> list[asyncio.Server]:
    """Forward connections to `listen`:port to `target`:port, both ways, for each port."""

    def handler(port: int) -> Callable:
        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(target, port)
            except OSError as e:
                log.error("relay: cannot reach the outer at %s:%d: %s", target, port, e)
                writer.close()
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        return relay

    return [await asyncio.start_server(handler(p), listen, p) for p in ports]


# -- the launcher ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """What a confined run was given (for tests and logs)."""

    meter: str
    quota_bytes: int
    user: str


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from uplimit.cli import main; main()", *args]


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
    require_confinable()
    try:
        account = pwd.getpwnam(config.inner.user)
    except KeyError:
        raise ConfigError(f"inner.user {config.inner.user!r} does not exist") from None
    user = (account.pw_uid, account.pw_gid)
    if user[0] == 0:
        raise ConfigError("inner.user must not be root")
    where = ledger_location(config)
    budgets = budgets_for(config)
    env, dirs = _writable_dirs(config)
    _check_access(config, config_path, user)
    _give(dirs, where, user)
    secret = load_secret(link_secret_path(config))
    ledger = open_served(where, budgets)
    meter = KernelMeter(config.outer.kernel_meter or DEFAULT_METER,
                        kernel_quota_bytes(budgets.lifetime_bytes))  # fmt: skip
    child_env = {**os.environ, **env, "HOME": account.pw_dir or "/"}
    launch = Launch(meter.name, meter.quota_bytes, config.inner.user)

    async def serve() -> int:
        rundir = Path(tempfile.mkdtemp(prefix="uplimit-inner-"))
        rundir.chmod(0o711)  # the user may reach the socket inside, not list or write here
        servers: list[asyncio.Server] = []
        # The link's secret, for the child's side of the challenge: a copy only its user reads
        # (the original is root's, 0600).
        secret_copy = rundir / "link.secret"
        fd = os.open(secret_copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
        with os.fdopen(fd, "wb") as f:
            os.fchown(f.fileno(), *user)
            f.write(secret)
        child_env["UPLIMIT_LINK_SECRET_FILE"] = str(secret_copy)
        try:
            service = ChargeService(ledger, rundir / "charge.sock", owner=user)
            try:
                meter.teardown()  # a namespace left by a crashed launcher of the same name
                meter.create()
                ports = [config.link.downlink_port, config.link.uplink_port]
                servers = await _relay(meter.outer_address, host or config.link.host, ports)
                argv = ["serve", "inner", "--host", meter.outer_address,
                        "--charge-socket", str(service.path)]  # fmt: skip
                argv += ["--config", str(config_path)] if config_path is not None else []
                command = meter.command(_cli(*argv), user=user)
                proc = await asyncio.create_subprocess_exec(*command, env=child_env)
                log.info("inner: confined in namespace %s (quota %s bytes) as %s",
                         meter.netns, f"{meter.quota_bytes:,}", launch.user)  # fmt: skip
                if on_launch is not None:
                    on_launch(launch)
                return await _wait(proc)
            finally:
                for server in servers:
                    server.close()
                meter.teardown()
                service.close()
        finally:
            ledger.close()
            secret_copy.unlink()
            rundir.rmdir()

    return serve()


async def _wait(proc: asyncio.subprocess.Process) -> int:
    """The child's exit status; if this is cancelled, stop it (SIGTERM, then SIGKILL)."""
    try:
        return await proc.wait()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
