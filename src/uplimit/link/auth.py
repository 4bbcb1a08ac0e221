"""The link's authentication: a challenge-response over a shared secret, both ways.

The outer listens on two ports; anyone who can reach them could otherwise take the inner's
place (receive every prompt, answer with any text). So the outer takes a connection only from
a configured address (`[link] inner_addresses`; others are closed unread), and a downlink
becomes the link's only once the inner has proved it holds the secret (`[link] secret_file`):

    outer -> inner  downlink   CHALLENGE_MAGIC, nonce_o             (32 random bytes)
    inner -> outer  uplink     nonce_i, HMAC(secret, INNER | nonce_o | nonce_i)   (charged)
    outer -> inner  downlink   HMAC(secret, OUTER | nonce_o | nonce_i), then PREAMBLE, HELLO

HMAC-SHA256, compared in constant time (`hmac.compare_digest`); each side's nonce makes the
proof fresh for both (a recorded exchange replays to neither), and the two labels keep one
side's proof from serving as the other's. Until a downlink has been proved, it is one of the
outer's pending candidates and holds no slot: a foreign connection made first waits (and times
out) beside the real inner's, which proves itself and takes the link. An uplink whose proof
matches no candidate is closed and alarmed; its bytes count against the receive budget like
any others from the inner's address. The inner checks the outer's proof before it believes
HELLO, so a foreign listener on the outer's ports learns nothing but a challenge.

The secret: at least `SECRET_BYTES` random bytes in a file readable by its owner only
(`create_secret` writes one; `load_secret` refuses anything else: fail closed).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
from pathlib import Path

from uplimit.errors import ConfigError

__all__ = [
    "CHALLENGE_BYTES",
    "CHALLENGE_MAGIC",
    "MAX_PENDING",
    "NONCE_BYTES",
    "PROOF_BYTES",
    "RESPONSE_BYTES",
    "SECRET_BYTES",
    "allowed_addresses",
    "create_secret",
    "inner_proof",
    "load_secret",
    "new_nonce",
    "outer_proof",
    "proof_matches",
]

CHALLENGE_MAGIC = b"UPLA\x01"  # before the downlink's preamble: this link authenticates, v1
NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
CHALLENGE_BYTES = len(CHALLENGE_MAGIC) + NONCE_BYTES
RESPONSE_BYTES = NONCE_BYTES + PROOF_BYTES  # the inner's, charged like any upload
SECRET_BYTES = 32
# Downlinks waiting to prove themselves. Only configured addresses get this far (the inner's
# own hosts), so the cap bounds memory, not a stranger.
MAX_PENDING = 16

_INNER = b"uplimit link v1: inner proves"
_OUTER = b"uplimit link v1: outer proves"


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _proof(secret: bytes, label: bytes, nonce_o: bytes, nonce_i: bytes) -> bytes:
    if len(nonce_o) != NONCE_BYTES or len(nonce_i) != NONCE_BYTES:
        raise ConfigError(f"nonces are {NONCE_BYTES} bytes")
    return hmac.new(secret, label + nonce_o + nonce_i, hashlib.sha256).digest()


def inner_proof(secret: bytes, nonce_o: bytes, nonce_i: bytes) -> bytes:
    return _proof(secret, _INNER, nonce_o, nonce_i)


def outer_proof(secret: bytes, nonce_o: bytes, nonce_i: bytes) -> bytes:
    return _proof(secret, _OUTER, nonce_o, nonce_i)


def proof_matches(expected: bytes, got: bytes) -> bool:
    """Constant-time comparison (a timing difference would leak the proof byte by byte)."""
    return hmac.compare_digest(expected, got)


def load_secret(path: str | Path) -> bytes:
    """The link's secret; ConfigError if the file is missing, short, or readable by others."""
    p = Path(path).expanduser()
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise ConfigError(
            f"cannot read the link secret [link] secret_file = {str(p)!r}: {e.strerror}"
            " (`uplimit link-secret` creates one; copy it to both sides)"
        ) from e
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        secret = f.read(1 << 16)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the link secret {p} is open to other users: chmod 600 it")
    if len(secret) < SECRET_BYTES:
        raise ConfigError(f"the link secret {p} has {len(secret)} bytes; it needs {SECRET_BYTES}")
    return secret


def create_secret(path: str | Path) -> Path:
    """Write a new random secret, owner-only (0600); never overwrites one."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError as e:
        raise ConfigError(f"the link secret {p} exists; not overwriting it") from e
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(SECRET_BYTES))
    return p


def allowed_addresses(spec: str) -> frozenset[str]:
    """`[link] inner_addresses`: IP addresses, comma-separated, in canonical form."""
    out = set()
    for part in spec.split(","):
        try:
            out.add(str(ipaddress.ip_address(part.strip())))
        except ValueError as e:
            raise ConfigError(f"[link] inner_addresses: {part.strip()!r} is no IP address") from e
    return frozenset(out)
