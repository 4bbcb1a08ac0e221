"""The kernel meter: a confined side (the inner, the relay) in its own network namespace, behind
an nftables quota.

Layout, all created and removed by name (`name`: 1-10 of [a-z0-9-], not starting with -):

    root namespace                          namespace "uplimit-<name>" (the inner side)
    ulo-<name>  10.201.X.Y+1/30  <--veth-->  uli-<name>  10.201.X.Y+2/30,  lo

The /30 is block `index` (0..16383) of 10.201.0.0/16, by default picked from a hash of the name;
creation refuses if any interface already holds an address in it. The inner side reaches only
the outer end of its veth (no other route), and IPv6 is off in the namespace so nothing else
leaves it.

Inside the namespace, table `inet uplimit` hooks output on `uli-<name>`; every packet that
leaves goes through chain `metered`:

    quota up { over Q bytes }      every packet first meets the quota; once Q is reached the
                                   packet and all after it are dropped ("dropped" counter)
    counter sent                   IP bytes and packets that passed, i.e. left the namespace
    counter ctl                    of those, TCP segments with no payload: the ACKs the inner
                                   sends for downlink traffic, SYN, FIN
    counter tcp5 .. tcp15          of those, TCP over plain IPv4 by header length (doff), so the
                                   TCP payload is sum(bytes - packets * (20 + 4 * doff)), exactly
    counter other                  anything else that passed (not TCP, or IPv4 options)

A *gated* meter (`Gate`: the relay's, which also accepts connections) sends to `metered` only
what the namespace originates towards the veth's outer end on the gate's `connects` ports
(conntrack direction original: the link it uploads on). Packets of connections opened from
outside to one of its `serves` ports (direction reply: the namespace did not open them) leave
uncounted by the quota ("served" counter), and everything else the namespace sends is dropped
("refused" counter). Conntrack's direction is set by whoever sent a connection's first packet,
so a process inside cannot make a connection of its own look served, whatever ports it binds.

The quota counts IP packets as the output hook sees them (one header per GSO packet), headers
included, so what passed holds fewer than Q payload bytes. nft reports the quota's `used` capped
at Q; the counters keep going. Processes started with `command`, `popen` or `run` lose every
capability (`setpriv`), and with `user` their root identity too, so even a compromised inner
process cannot remove the quota.

Needs root on Linux with `ip` (iproute2), `nft` (nftables) and `setpriv` (util-linux):
`available()` says whether, and why not.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uplimit.errors import ConfigError, KernelMeterError

__all__ = ["Availability", "Gate", "KernelMeter", "KernelReading", "available"]

SUBNET = ipaddress.IPv4Network("10.201.0.0/16")
_BLOCKS = SUBNET.num_addresses // 4
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,9}")  # "ulo-" + name must fit in 15 characters
_DOFFS = range(5, 16)  # TCP header length in 32-bit words
_CAP_NET_ADMIN, _CAP_SYS_ADMIN = 12, 21
_TOOLS = {"ip": "iproute2", "nft": "nftables", "setpriv": "util-linux"}
# Every capability gone, for good, in what runs inside (a compromised inner must not be able
# to flush the quota). The uid stays 0 so it can still read the project's root-owned files.
_DROP_CAPS = [
    "setpriv",
    "--no-new-privs",
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--bounding-set=-all",
    "--",
]
_TIMEOUT_S = 30  # any ip/nft call; a hang means a wedged kernel or tool: fail


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str  # why not, or what is used


def available() -> Availability:
    """Whether this process can build a kernel meter here, and if not, why not."""
    if sys.platform != "linux":
        return Availability(False, f"the kernel meter needs Linux (this is {sys.platform})")
    if os.geteuid() != 0:
        return Availability(False, "the kernel meter needs root (network namespaces, nftables)")
    for tool, package in _TOOLS.items():
        if shutil.which(tool) is None:
            return Availability(False, f"`{tool}` not found (Debian: apt-get install {package})")
    caps = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            caps = int(line.split()[1], 16)
    for bit, cap in ((_CAP_NET_ADMIN, "CAP_NET_ADMIN"), (_CAP_SYS_ADMIN, "CAP_SYS_ADMIN")):
        if not caps >> bit & 1:
            return Availability(False, f"root here lacks {cap} (a restricted container?)")
    return Availability(True, "root with ip, nft and setpriv")


@dataclass(frozen=True)
class KernelReading:
    """Counters read back from the namespace (module doc)."""

    quota_bytes: int
    quota_used_bytes: int  # as nft reports it: capped at quota_bytes
    sent_bytes: int
    sent_packets: int
    dropped_bytes: int  # includes the sender's retransmissions of dropped data
    dropped_packets: int
    ctl_bytes: int
    ctl_packets: int
    tcp_payload_bytes: int
    other_bytes: int
    other_packets: int
    served_bytes: int  # a gated meter's replies on connections opened from outside: uncounted
    served_packets: int
    refused_bytes: int  # what a gated meter's namespace tried to send anywhere else
    refused_packets: int

    @property
    def over_quota(self) -> bool:
        return self.dropped_packets > 0


@dataclass(frozen=True)
class Gate:
    """A namespace that serves as well as uploads (module doc): the TCP ports it accepts
    connections on (its replies leave uncounted), and the ports on the veth's outer end that it
    may connect to (through the quota). It sends nothing else."""

    serves: tuple[int, ...]
    connects: tuple[int, ...]

    def __post_init__(self) -> None:
        for port in (*self.serves, *self.connects):
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ConfigError(f"a gate's ports are 1..65535, got {port!r}")
        if not self.connects:
            raise ConfigError("a gate needs the ports its namespace uploads on")


def _ruleset(ifname: str, quota_bytes: int, gate: Gate | None, outer_address: str) -> str:
    counters = ["sent", "dropped", "ctl", "other", "served", "refused",
                *(f"tcp{d}" for d in _DOFFS)]  # fmt: skip
    by_doff = []
    for d in _DOFFS:
        header = 20 + 4 * d
        by_doff.append(f'    tcp doff {d} ip length {header} counter name "ctl"')
        by_doff.append(f'    tcp doff {d} counter name "tcp{d}" return')
    if gate is None:
        entry = [f'    oifname "{ifname}" goto metered']
    else:
        serves = ", ".join(map(str, gate.serves))
        connects = ", ".join(map(str, gate.connects))
        served = (
            [f'    oifname "{ifname}" ct direction reply ip daddr {outer_address}'
             f' tcp sport {{ {serves} }} counter name "served" accept']
            if gate.serves else []
        )  # fmt: skip
        entry = [
            *served,
            f'    oifname "{ifname}" ct direction original ip daddr {outer_address}'
            f" tcp dport {{ {connects} }} goto metered",
            f'    oifname "{ifname}" counter name "refused" drop',
        ]
    lines = [
        "table inet uplimit {",
        f"  quota up {{ over {quota_bytes} bytes }}",
        *(f"  counter {c} {{ }}" for c in counters),
        "  chain output {",
        "    type filter hook output priority filter; policy accept;",
        *entry,
        "  }",
        "  chain metered {",
        '    quota name "up" counter name "dropped" drop',
        '    counter name "sent"',
        "    ip hdrlength 5 meta l4proto tcp goto tcp_out",
        '    counter name "other"',
        "  }",
        "  chain tcp_out {",
        *by_doff,
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _call(argv: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelMeterError(f"{' '.join(argv)}: {e}") from e


def _run(argv: list[str], *, stdin: str | None = None) -> str:
    """stdout of `argv`; raise if it fails."""
    done = _call(argv, stdin)
    if done.returncode != 0:
        raise KernelMeterError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _succeeds(argv: list[str]) -> bool:
    return _call(argv, None).returncode == 0


class KernelMeter:
    """A network namespace for a confined side with an nftables quota on its way out.

    Use as a context manager (`with KernelMeter(name, quota) as km:`) or `create()` then
    `teardown()`; teardown removes everything by name and also cleans up after a crashed run.
    """

    def __init__(
        self, name: str, quota_bytes: int, *, index: int | None = None, gate: Gate | None = None
    ) -> None:
        if not _NAME.fullmatch(name):
            raise ConfigError(f"kernel meter name must be 1-10 of [a-z0-9-], got {name!r}")
        if isinstance(quota_bytes, bool) or not isinstance(quota_bytes, int) or quota_bytes < 1:
            raise ConfigError(f"quota must be a positive int of bytes, got {quota_bytes!r}")
        block = zlib.crc32(name.encode()) % _BLOCKS if index is None else index
        if not 0 <= block < _BLOCKS:
            raise ConfigError(f"subnet index must be in 0..{_BLOCKS - 1}, got {block}")
        self.name = name
        self.quota_bytes = quota_bytes
        self.gate = gate
        self.netns = f"uplimit-{name}"
        self.outer_ifname = f"ulo-{name}"
        self.inner_ifname = f"uli-{name}"
        self.network = ipaddress.IPv4Network((int(SUBNET.network_address) + 4 * block, 30))
        self.outer_address = str(self.network.network_address + 1)
        self.inner_address = str(self.network.network_address + 2)

    def __enter__(self) -> KernelMeter:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _check_free(self) -> None:
        if self.netns in _run(["ip", "netns", "list"]).split():
            raise KernelMeterError(f"namespace {self.netns} exists (stale? teardown() removes it)")
        for link in json.loads(_run(["ip", "-j", "addr", "show"]) or "[]"):
            for addr in link.get("addr_info", []):
                if addr.get("family") == "inet" and (
                    ipaddress.IPv4Address(addr["local"]) in self.network
                ):
                    raise KernelMeterError(
                        f"{self.network} is in use on {link['ifname']}: pick another index"
                    )

    def create(self) -> None:
        """Build namespace, veth pair, addresses and quota; on any failure remove them all."""
        self._check_free()
        ns = ["ip", "netns", "exec", self.netns]
        try:
            _run(["ip", "netns", "add", self.netns])
            # IPv6 off before any interface exists, so no link-local chatter leaves.
            for conf in ("all", "default"):
                _run([*ns, "sysctl", "-qw", f"net.ipv6.conf.{conf}.disable_ipv6=1"])
            # The quota is in place before the inner end can carry a packet.
            rules = _ruleset(self.inner_ifname, self.quota_bytes, self.gate, self.outer_address)
            _run([*ns, "nft", "-f", "-"], stdin=rules)
            veth = ["type", "veth", "peer", "name", self.inner_ifname, "netns", self.netns]
            _run(["ip", "link", "add", self.outer_ifname, *veth])
            _run(["sysctl", "-qw", f"net.ipv6.conf.{self.outer_ifname}.disable_ipv6=1"])
            _run(["ip", "addr", "add", f"{self.outer_address}/30", "dev", self.outer_ifname])
            _run(["ip", "link", "set", self.outer_ifname, "up"])
            inner = ["ip", "-n", self.netns]
            _run([*inner, "addr", "add", f"{self.inner_address}/30", "dev", self.inner_ifname])
            _run([*inner, "link", "set", self.inner_ifname, "up"])
            _run([*inner, "link", "set", "lo", "up"])
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        """Remove what `create` made, by name: kill what runs inside, the veth, the namespace.

        Deleting the veth explicitly matters: sockets left in the namespace (e.g. retransmitting
        into the quota) keep it, and so its veth, alive after `ip netns del`.
        """
        if self.netns in _run(["ip", "netns", "list"]).split():
            for pid in _run(["ip", "netns", "pids", self.netns]).split():
                with contextlib.suppress(ProcessLookupError):  # it may have ended on its own
                    os.kill(int(pid), signal.SIGKILL)
            _run(["ip", "netns", "del", self.netns])
        # The namespace's deletion may take the veth with it at any moment (it is asynchronous).
        if not _succeeds(["ip", "link", "del", self.outer_ifname]) and _succeeds(
            ["ip", "link", "show", self.outer_ifname]
        ):
            raise KernelMeterError(f"could not remove {self.outer_ifname}")

    def command(
        self, argv: list[str], *, privileged: bool = False, user: tuple[int, int] | None = None
    ) -> list[str]:
        """`argv` as a command line that runs inside the namespace, without capabilities
        unless `privileged`; as `user` (uid, gid, no supplementary groups) when given."""
        if privileged:
            return ["ip", "netns", "exec", self.netns, *argv]
        switch = (
            [] if user is None else [f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups"]
        )
        drop = [_DROP_CAPS[0], *switch, *_DROP_CAPS[1:]]
        return ["ip", "netns", "exec", self.netns, *drop, *argv]

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start `argv` inside the namespace, without capabilities (`subprocess.Popen` kwargs)."""
        return subprocess.Popen(self.command(argv), **kwargs)

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Run `argv` inside the namespace, without capabilities (`subprocess.run` kwargs)."""
        return subprocess.run(self.command(argv), **kwargs)

    def read(self) -> KernelReading:
        """The quota and every counter, from one `nft -j list table`."""
        out = _run(self.command(["nft", "-j", "list", "table", "inet", "uplimit"], privileged=True))
        try:
            objects = json.loads(out)["nftables"]
            counters: dict[str, dict[str, int]] = {
                o["counter"]["name"]: o["counter"] for o in objects if "counter" in o
            }
            (quota,) = (o["quota"] for o in objects if "quota" in o)
            payload = sum(
                counters[f"tcp{d}"]["bytes"] - counters[f"tcp{d}"]["packets"] * (20 + 4 * d)
                for d in _DOFFS
            )
            return KernelReading(
                quota_bytes=quota["bytes"],
                quota_used_bytes=quota["used"],
                sent_bytes=counters["sent"]["bytes"],
                sent_packets=counters["sent"]["packets"],
                dropped_bytes=counters["dropped"]["bytes"],
                dropped_packets=counters["dropped"]["packets"],
                ctl_bytes=counters["ctl"]["bytes"],
                ctl_packets=counters["ctl"]["packets"],
                tcp_payload_bytes=payload,
                other_bytes=counters["other"]["bytes"],
                other_packets=counters["other"]["packets"],
                served_bytes=counters["served"]["bytes"],
                served_packets=counters["served"]["packets"],
                refused_bytes=counters["refused"]["bytes"],
                refused_packets=counters["refused"]["packets"],
            )
        except (KeyError, ValueError, TypeError) as e:
            raise KernelMeterError(f"unexpected nft output for {self.netns}: {e!r}") from e
