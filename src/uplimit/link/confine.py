"""The launcher of a confined side, shared by the inner (`inner.confine`) and the relay
(`relay.confine`): its own network namespace behind the kernel quota (`link.kernel`), an
unprivileged user with no capabilities, and charge-only access to its ledger
(`link.charge_service`).

The launcher stays root, outside the namespace. Each side prepares a `Confinement` (which
meter, which ledger, which user, which ports, which secrets) after its own checks; `serve`
then

1. serves the ledger charge-only on a unix socket that only the side's user can open, in a
   directory (mode 0711) that holds it and copies of the side's secrets, each readable by that
   user only (the originals stay root's);
2. builds the kernel meter (a namespace left by a crashed launcher of the same name goes first);
3. forwards connections: from the outer end of the veth to `upstream` (the side's link to
   whatever it uploads to; the namespace has no other route), and for a side that also serves
   (the relay) from each configured address into the namespace (`Inbound`);
4. starts `uplimit <argv> --charge-socket PATH` inside the namespace as the user with every
   capability dropped (`setpriv`), and waits for it;
5. watches the quota: once it has dropped a packet, the link cannot carry a whole frame any
   more, so the launcher closes the upstream connections (an ALARM line): the peer sees the
   link fail instead of waiting for frames that never come (fail closed);
6. at the end removes the namespace, the socket, the copies and the forwarders.

`check_confined` is what the child runs before it claims confinement at its handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import pwd
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uplimit
from uplimit.errors import ConfigError, KernelMeterError
from uplimit.link.charge_service import ChargeService
from uplimit.link.kernel import Availability, KernelMeter, available
from uplimit.link.ledger import Ledger

__all__ = [
    "Confinement",
    "Forwarder",
    "Inbound",
    "Launch",
    "check_access",
    "check_confined",
    "check_runnable",
    "confinable",
    "give",
    "kernel_quota_bytes",
    "places",
    "probe",
    "require_confinable",
    "serve",
    "unprivileged",
]

log = logging.getLogger(__name__)

# The kernel quota counts IP bytes leaving the namespace. Uplink payload is at most the
# lifetime budget L (every byte is charged first). Each uplink write is one TCP segment with
# 52 bytes of IP and TCP headers (timestamps on); budgeting for writes that carry at least
# MIN_WRITE_BYTES charged bytes on average gives headers <= 52 * L / MIN_WRITE_BYTES. The side
# also sends ACKs for downlink traffic (52 bytes per ~2 segments): ACK_ALLOWANCE_FACTOR * L of
# them, i.e. about 56 * L bytes of downlink at full-sized segments.
HEADER_BYTES = 52
MIN_WRITE_BYTES = 16
ACK_ALLOWANCE_FACTOR = 1
STOP_TIMEOUT_S = 30.0
QUOTA_POLL_S = 1.0  # how often the launcher reads the quota (one `nft` call)


def kernel_quota_bytes(lifetime_bytes: int) -> int:
    """L + 52 * ceil(L / 16) + L: payload, headers, ACKs (module constants, docs/security.md)."""
    headers = HEADER_BYTES * -(-lifetime_bytes // MIN_WRITE_BYTES)
    return lifetime_bytes + headers + ACK_ALLOWANCE_FACTOR * lifetime_bytes


def require_confinable(side: str) -> None:
    """Raise `ConfigError` unless this process can confine `side` (root, ip, nft, setpriv)."""
    can = available()
    if not can.ok:
        raise ConfigError(
            f"cannot confine {side}: {can.reason}; `--unconfined` serves without"
            " confinement (an ALARM)"
        )


def check_confined(side: str) -> None:
    """Before a child claims confinement: it must run as a non-root user with no capabilities."""
    if os.geteuid() == 0:
        raise ConfigError(f"--charge-socket is the confined {side}'s: it must not run as root")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("CapEff:", "CapPrm:", "CapBnd:")) and int(line.split()[1], 16):
            raise ConfigError(f"the confined {side} still has capabilities ({line})")


def unprivileged(name: str, key: str) -> pwd.struct_passwd:
    """The account `name` (configured as `key`), which must exist and not be root."""
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"{key} {name!r} does not exist") from None
    if account.pw_uid == 0:
        raise ConfigError(f"{key} must not be root")
    return account


# -- the files a side writes -------------------------------------------------------------------


def places(
    state: Path, written: Mapping[str, tuple[str, str]], directories: frozenset[str]
) -> tuple[dict[str, str], list[Path]]:
    """(environment for the child, directories its user must own) for `written`: environment
    variable -> (configured value, default name under `state`); the variables in `directories`
    name a directory of their own, the others a file whose directory the user gets."""
    env, dirs = {}, []
    for var, (value, name) in written.items():
        path = Path(value).expanduser() if value else state / name
        env[var] = str(path)
        dirs.append(path if var in directories else path.parent)
    return env, dirs


def _as_user(uid: int, gid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]


def probe(user: tuple[int, int], test: str, path: Path) -> bool:
    """Whether `test -<test> path` succeeds as `user` (uid, gid, no groups)."""
    done = subprocess.run([*_as_user(*user), "test", test, str(path)], timeout=30, check=False)
    return done.returncode == 0


def check_runnable(user: tuple[int, int], side: str) -> None:
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
        f"the {side}'s user cannot run {sys.executable} with {ours} ({why}): it must be able to"
        " read the code and the virtualenv, and to enter every directory above them"
    )


def confinable(user: str = "nobody") -> Availability:
    """Whether this process can confine a side as `user` here: the kernel meter, and the
    user's access to this very code (the demos choose confined or unconfined by it)."""
    can = available()
    if not can.ok:
        return can
    try:
        account = unprivileged(user, "the confined side's user")
        check_runnable((account.pw_uid, account.pw_gid), "confined side")
    except ConfigError as e:
        return Availability(False, str(e))
    return can


def check_access(
    user: tuple[int, int], side: str, *, unwritable: list[Path], readable: list[Path]
) -> None:
    """As the user: it must run this code (the interpreter, the virtualenv, the checkout), and,
    by probing with `test`, must not write `unwritable` and must read `readable`."""
    check_runnable(user, side)
    for path in unwritable:
        if probe(user, "-w", path):
            raise ConfigError(f"the {side}'s user can write {path}: it must not (docs/security.md)")
    for path in readable:
        if not probe(user, "-r", path):
            raise ConfigError(f"the {side}'s user cannot read {path}")


def give(dirs: list[Path], ledger: str, user: tuple[int, int], side: str) -> None:
    """Make the side's directories the user's; never the ledger's."""
    if not ledger.startswith(("postgresql://", "postgres://")):
        ledger_dir = Path(ledger).resolve().parent
        for d in dirs:
            if d.resolve() == ledger_dir:
                raise ConfigError(
                    f"{d} holds the ledger: the confined {side} must not write there; point"
                    f" the {side}'s files elsewhere (or leave their keys unset)"
                )
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, *user)


# -- forwarding connections --------------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


class Forwarder:
    """Connections to `listen`:port forwarded to `target`:port, both ways, for each port;
    from the peers in `allowed` only, when given. `close` ends the listeners and every
    connection they forwarded."""

    def __init__(self) -> None:
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    async def start(
        cls, listen: str, target: str, ports: tuple[int, ...], allowed: frozenset[str] | None
    ) -> Forwarder:
        forwarder = cls()
        try:
            for port in ports:
                handler = forwarder._handler(target, port, allowed)
                forwarder._servers.append(await asyncio.start_server(handler, listen, port))
        except BaseException:
            forwarder.close()
            raise
        return forwarder

    def _handler(self, target: str, port: int, allowed: frozenset[str] | None) -> Callable:
        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = str(ipaddress.ip_address(writer.get_extra_info("peername")[0]))
            if allowed is not None and peer not in allowed:
                log.warning("forwarder: refused a connection to port %d from %s", port, peer)
                writer.close()
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(target, port)
            except OSError as e:
                log.error("forwarder: cannot reach %s:%d: %s", target, port, e)
                writer.close()
                return
            pair = {writer, up_writer}
            self._writers |= pair
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                self._writers -= pair

        return forward

    def close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in self._writers:
            writer.close()


@dataclass(frozen=True)
class Inbound:
    """Connections to `host` on `ports`, forwarded into the namespace (a side that serves);
    from `allowed` peers only, when given."""

    host: str
    ports: tuple[int, ...]
    allowed: frozenset[str] | None = None


# -- the launcher ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """What a confined run was given (for tests and logs)."""

    meter: str
    quota_bytes: int
    user: str


@dataclass
class Confinement:
    """Everything `serve` needs, prepared and checked by the side's launcher (module doc)."""

    side: str  # "inner", "relay": logs and messages
    meter: KernelMeter
    ledger: Ledger  # served charge-only; closed at the end
    account: pwd.struct_passwd
    argv: list[str]  # the child's uplimit arguments; `--charge-socket PATH` is added
    upstream: tuple[str, tuple[int, ...]]  # where the namespace's link goes: host, ports
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's
    secrets: dict[str, bytes] = field(default_factory=dict)  # env variable -> a secret's bytes
    inbound: list[Inbound] = field(default_factory=list)
    forward_signals: bool = False  # SIGTERM/SIGINT to this process stop the child (cleanly)

    @property
    def user(self) -> tuple[int, int]:
        return self.account.pw_uid, self.account.pw_gid


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from uplimit.cli import main; main()", *args]


def _copy_secret(rundir: Path, name: str, secret: bytes, user: tuple[int, int]) -> Path:
    """A copy of `secret` only `user` can read (the original is root's, 0600)."""
    path = rundir / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    with os.fdopen(fd, "wb") as f:
        os.fchown(f.fileno(), *user)
        f.write(secret)
    return path


def serve(
    c: Confinement, on_launch: Callable[[Launch], None] | None = None
) -> Coroutine[Any, Any, int]:
    """The coroutine that runs the confined child until it exits and gives its exit status
    (module doc)."""
    launch = Launch(c.meter.name, c.meter.quota_bytes, c.account.pw_name)
    meter = c.meter

    async def run() -> int:
        rundir = Path(tempfile.mkdtemp(prefix=f"uplimit-{c.side}-"))
        rundir.chmod(0o711)  # the user may reach the socket inside, not list or write here
        env = {**os.environ, **c.env, "HOME": c.account.pw_dir or "/"}
        copies: list[Path] = []
        forwarders: list[Forwarder] = []
        try:
            for i, (var, secret) in enumerate(c.secrets.items()):
                copies.append(_copy_secret(rundir, f"secret-{i}", secret, c.user))
                env[var] = str(copies[-1])
            service = ChargeService(c.ledger, rundir / "charge.sock", owner=c.user)
            try:
                meter.teardown()  # a namespace left by a crashed launcher of the same name
                meter.create()
                host, ports = c.upstream
                upstream = await Forwarder.start(meter.outer_address, host, ports, None)
                forwarders.append(upstream)
                for inbound in c.inbound:
                    forwarders.append(await Forwarder.start(
                        inbound.host, meter.inner_address, inbound.ports, inbound.allowed
                    ))  # fmt: skip
                argv = [*c.argv, "--charge-socket", str(service.path)]
                command = meter.command(_cli(*argv), user=c.user)
                proc = await asyncio.create_subprocess_exec(*command, env=env)
                log.info("%s: confined in namespace %s (quota %s bytes) as %s", c.side,
                         meter.netns, f"{meter.quota_bytes:,}", launch.user)  # fmt: skip
                if on_launch is not None:
                    on_launch(launch)
                watch = asyncio.create_task(_watch_quota(c.side, meter, upstream))
                try:
                    return await _wait(proc, c.forward_signals)
                finally:
                    watch.cancel()
            finally:
                for forwarder in forwarders:
                    forwarder.close()
                meter.teardown()
                service.close()
        finally:
            c.ledger.close()
            for copy in copies:
                copy.unlink()
            rundir.rmdir()

    return run()


async def _watch_quota(side: str, meter: KernelMeter, upstream: Forwarder) -> None:
    """Close the upstream connections once the quota drops a packet, or cannot be read."""
    while True:
        await asyncio.sleep(QUOTA_POLL_S)
        try:
            reading = await asyncio.to_thread(meter.read)
        except KernelMeterError as e:
            log.error("ALARM quota-unreadable: %s: %s; closing the %s's link", meter.netns, e, side)
            break
        if reading.over_quota:
            log.error("ALARM quota-exhausted: the kernel quota of %s (%s bytes) dropped %d"
                      " packets; closing the %s's link", meter.netns, f"{reading.quota_bytes:,}",
                      reading.dropped_packets, side)  # fmt: skip
            break
    upstream.close()


async def _wait(proc: asyncio.subprocess.Process, forward_signals: bool) -> int:
    """The child's exit status; if this is cancelled, stop it (SIGTERM, then SIGKILL). With
    `forward_signals`, SIGTERM and SIGINT sent to this process go to the child instead."""
    loop = asyncio.get_running_loop()
    caught = (signal.SIGTERM, signal.SIGINT) if forward_signals else ()
    for sig in caught:
        loop.add_signal_handler(sig, _signal_child, proc)
    try:
        return await proc.wait()
    finally:
        for sig in caught:
            loop.remove_signal_handler(sig)
        if proc.returncode is None:
            _signal_child(proc)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _signal_child(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
