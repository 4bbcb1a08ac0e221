"""Charge-only access to a ledger, for an inner side that must not be able to write it.

The privileged launcher (root, outside the inner's namespace) owns the ledger and serves it on
a unix socket (`ChargeService`); the confined inner charges through `ChargeClient`, which has
the `Ledger` interface. Over the socket there are exactly two requests, so nothing the inner
sends can lower the usage, clear the latch or change a budget:

    {"op": "charge", "n_bytes": N, "timing_bytes": T, "note": "..."}   -> a receipt, or refused
    {"op": "usage"}                                                     -> the budget's state

One JSON object per line each way. Requests are parsed strictly: a line over `MAX_LINE_BYTES`,
not an object, an unknown op, a missing, extra or mistyped key closes the connection (and is
logged); the ledger itself checks the numbers (`Ledger.charge`). A refusal carries the latched
budget's name and message, as `BudgetExhausted` does in process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any

from uplimit.errors import BudgetExhausted, ConfigError, LedgerError
from uplimit.link.budget import Budgets, Limit, Usage
from uplimit.link.ledger import BudgetChange, ChargeReceipt, ChargeRecord, Ledger, LedgerState

__all__ = ["MAX_LINE_BYTES", "ChargeClient", "ChargeService"]

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 4096  # a charge request with a note of a few hundred bytes
_CHARGE_KEYS = {"op", "n_bytes", "timing_bytes", "note"}
_TIMEOUT_S = 120.0  # a charge waits for the ledger's lock (LOCK_WAIT_S = 60 s) at most


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an int, got {value!r}")
    return value


def _request(line: bytes) -> dict[str, Any]:
    """One request, parsed strictly (module doc)."""
    try:
        msg = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"not JSON: {e}") from e
    if not isinstance(msg, dict):
        raise ConfigError("a request is a JSON object")
    if msg.get("op") == "usage" and set(msg) == {"op"}:
        return msg
    if msg.get("op") == "charge" and set(msg) == _CHARGE_KEYS:
        _int(msg["n_bytes"], "n_bytes")
        _int(msg["timing_bytes"], "timing_bytes")
        if not isinstance(msg["note"], str):
            raise ConfigError("note must be a string")
        return msg
    raise ConfigError(f"not a charge or usage request: keys {sorted(msg)}")


def _state_json(s: LedgerState) -> dict[str, Any]:
    b, u = s.budgets, s.usage
    return {
        "name": s.name,
        "budgets": [b.lifetime_bytes, b.per_day_bytes, b.per_second_bytes],
        "usage": [u.lifetime_bytes, u.day, u.day_bytes, u.second, u.second_bytes],
        "wire_bytes": s.wire_bytes,
        "timing_bytes": s.timing_bytes,
        "charges": s.charges,
        "exhausted_by": s.exhausted_by.value if s.exhausted_by else None,
        "exhausted_at": s.exhausted_at,
        "ledger_id": s.ledger_id,
        "created_at": s.created_at,
    }


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        while line := self.rfile.readline(MAX_LINE_BYTES + 1):
            try:
                if len(line) > MAX_LINE_BYTES or not line.endswith(b"\n"):
                    raise ConfigError(f"a request line is at most {MAX_LINE_BYTES} bytes")
                reply = self._answer(_request(line))
            except ConfigError as e:
                log.error("ALARM charge-service: malformed request, connection closed: %s", e)
                return
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    def _answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        ledger = self.server.ledger
        try:
            if msg["op"] == "usage":
                return {"ok": True, "state": _state_json(ledger.usage())}
            r = ledger.charge(msg["n_bytes"], timing_bytes=msg["timing_bytes"], note=msg["note"])
        except BudgetExhausted as e:
            return {"ok": False, "error": "exhausted", "limit": e.limit, "message": str(e)}
        except LedgerError as e:
            return {"ok": False, "error": "ledger", "message": str(e)}
        except ConfigError as e:  # the ledger refused the numbers
            return {"ok": False, "error": "invalid", "message": str(e)}
        receipt = [r.seq, r.n_bytes, r.timing_bytes, r.at, r.lifetime_bytes, r.remaining_bytes]
        return {"ok": True, "receipt": receipt}


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, ledger: Ledger) -> None:
        self.ledger = ledger
        super().__init__(path, _Handler)


class ChargeService:
    """Serve `ledger` charge-only on a unix socket at `path` (module doc), in a thread.

    `owner`: (uid, gid) that may connect: the socket is made theirs with mode 0600, so no
    other unprivileged user can charge (or read) the budget."""

    def __init__(self, ledger: Ledger, path: str | Path, *, owner: tuple[int, int] | None = None):
        self.path = Path(path)
        if self.path.exists():
            raise ConfigError(f"{self.path} exists: is another launcher serving it?")
        self._server = _Server(str(self.path), ledger)
        try:
            os.chmod(self.path, 0o600)
            if owner is not None:
                os.chown(self.path, *owner)
        except OSError:
            self._server.server_close()
            self.path.unlink(missing_ok=True)
            raise
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="charge-service", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self.path.unlink(missing_ok=True)


class ChargeClient:
    """A `Ledger` over a `ChargeService`: charge and usage only; the rest is refused."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # one request at a time on the one connection
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(_TIMEOUT_S)
            self._sock.connect(str(self.path))
        except OSError as e:
            raise LedgerError(f"cannot reach the charge service at {self.path}: {e}") from e
        self._file = self._sock.makefile("rwb")

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            try:
                self._file.write(json.dumps(request).encode() + b"\n")
                self._file.flush()
                line = self._file.readline(1 << 16)
            except OSError as e:
                raise LedgerError(f"charge service: {e}") from e
        if not line:
            raise LedgerError("the charge service closed the connection")
        try:
            reply = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LedgerError(f"charge service sent {line[:80]!r}") from e
        if reply.get("ok") is True:
            return reply
        message = str(reply.get("message", "no message"))
        if reply.get("error") == "exhausted":
            raise BudgetExhausted(message, limit=Limit(reply["limit"]).value)
        if reply.get("error") == "invalid":
            raise ConfigError(message)
        raise LedgerError(message)

    def charge(self, n_bytes: int, *, timing_bytes: int = 0, note: str = "") -> ChargeReceipt:
        request = {"op": "charge", "n_bytes": n_bytes, "timing_bytes": timing_bytes, "note": note}
        seq, n, timing, at, lifetime, remaining = self._call(request)["receipt"]
        return ChargeReceipt(seq, n, timing, at, lifetime, remaining)

    def usage(self) -> LedgerState:
        s = self._call({"op": "usage"})["state"]
        by = s["exhausted_by"]
        return LedgerState(
            name=s["name"],
            budgets=Budgets(*s["budgets"]),
            usage=Usage(*s["usage"]),
            wire_bytes=s["wire_bytes"],
            timing_bytes=s["timing_bytes"],
            charges=s["charges"],
            exhausted_by=Limit(by) if by is not None else None,
            exhausted_at=s["exhausted_at"],
            ledger_id=s["ledger_id"],
            created_at=s["created_at"],
        )

    def _refused(self, what: str) -> LedgerError:
        return LedgerError(f"{what} is not offered over the charge-only interface")

    def raise_budget(self, budgets: Budgets, *, who: str, reason: str) -> BudgetChange:
        raise self._refused("raising a budget")

    def alarms(self) -> list:
        raise self._refused("the alarm log")

    def budget_changes(self) -> list[BudgetChange]:
        raise self._refused("the budget changes")

    def charge_log(self, last: int | None = None) -> list[ChargeRecord]:
        raise self._refused("the charge log")

    def close(self) -> None:
        self._file.close()
        self._sock.close()
