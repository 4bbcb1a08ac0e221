"""Charge-only access over a real unix socket to a real SQLite ledger: the client charges and
reads, nothing sent over the socket can lower the usage or change a budget, and (as root) a
process running as an unprivileged user charges through the socket but cannot write the
ledger file itself."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from uplimit.errors import BudgetExhausted, LedgerError
from uplimit.link.budget import Budgets
from uplimit.link.charge_service import MAX_LINE_BYTES, ChargeClient, ChargeService
from uplimit.link.ledger import SqliteLedger, init_ledger


@pytest.fixture
def served(tmp_path):
    init_ledger(tmp_path / "ledger.db", Budgets(1000))
    ledger = SqliteLedger(tmp_path / "ledger.db")
    service = ChargeService(ledger, tmp_path / "charge.sock")
    yield ledger, service.path
    service.close()
    ledger.close()


def raw(path, data: bytes) -> bytes:
    """What the service answers `data` on a fresh connection ('' when it just closes)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(1 << 16):
            out += chunk
        return out


def test_the_client_charges_and_reads_like_the_ledger(served):
    ledger, path = served
    client = ChargeClient(path)
    try:
        r = client.charge(600, timing_bytes=2, note="frame")
        assert (r.n_bytes, r.timing_bytes, r.lifetime_bytes, r.remaining_bytes) == (
            600,
            2,
            602,
            398,
        )
        state = client.usage()
        assert state == ledger.usage()  # every field, the ledger id included
        with pytest.raises(BudgetExhausted, match="lifetime budget of 1,000") as refused:
            client.charge(500)
        assert refused.value.limit == "lifetime"
        with pytest.raises(BudgetExhausted):  # latched, for every caller
            client.charge(1)
        with pytest.raises(LedgerError, match="charge-only"):
            client.raise_budget(Budgets(10**9), who="inner", reason="more")
    finally:
        client.close()
    assert ledger.usage().usage.lifetime_bytes == 602
    assert ledger.usage().exhausted_by is not None


@pytest.mark.parametrize(
    "request_line",
    [
        {"op": "raise", "lifetime": 10**9},
        {"op": "charge", "n_bytes": -500, "timing_bytes": 0, "note": ""},
        {"op": "charge", "n_bytes": 10, "timing_bytes": 0, "note": "", "lifetime_bytes": 0},
        {"op": "charge", "n_bytes": True, "timing_bytes": 0, "note": ""},
        {"op": "charge", "n_bytes": 1.5, "timing_bytes": 0, "note": ""},
        {"op": "usage", "set": 0},
        [1, 2],
    ],
)
def test_nothing_over_the_socket_lowers_the_usage(served, request_line):
    ledger, path = served
    ledger.charge(100)
    answer = raw(path, json.dumps(request_line).encode() + b"\n")
    if answer:  # the ledger's own check refused it (a negative charge)
        reply = json.loads(answer)
        assert (reply["ok"], reply["error"]) == (False, "invalid")
    state = ledger.usage()
    assert (state.usage.lifetime_bytes, state.budgets) == (100, Budgets(1000))


def test_an_oversized_or_unterminated_line_closes_the_connection(served):
    ledger, path = served
    note = "x" * MAX_LINE_BYTES
    line = json.dumps({"op": "charge", "n_bytes": 1, "timing_bytes": 0, "note": note}) + "\n"
    assert raw(path, line.encode()) == b""
    assert raw(path, b'{"op": "usage"}') == b""  # no newline: never a request
    assert ledger.usage().charges == 0
    assert json.loads(raw(path, b'{"op": "usage"}\n'))["ok"] is True


_AS_USER = r"""
import json, sqlite3, sys
from uplimit.link.charge_service import ChargeClient
sock, ledger = sys.argv[1:]
client = ChargeClient(sock)
receipt = client.charge(7, note="from the unprivileged side")
try:
    db = sqlite3.connect(f"file:{ledger}?mode=rw", uri=True)
    db.execute("UPDATE uplimit_budget SET lifetime_bytes = 0, wire_bytes = 0, timing_bytes = 0")
    db.commit()
    wrote = True
except sqlite3.Error as e:
    wrote = str(e)
print(json.dumps({"charged": receipt.lifetime_bytes, "wrote": wrote}))
"""


def test_an_unprivileged_process_charges_but_cannot_write_the_ledger(missing):
    if os.geteuid() != 0:
        missing("kernel", "needs root to run a process as another user")
    nobody = pwd.getpwnam("nobody")
    # pytest's tmp_path is under a 0700 directory: the user may reach this one, not write it.
    tmp_path = Path(tempfile.mkdtemp(prefix="uplimit-charge-"))
    tmp_path.chmod(0o755)
    init_ledger(tmp_path / "ledger.db", Budgets(1000))
    ledger = SqliteLedger(tmp_path / "ledger.db")
    service = ChargeService(ledger, tmp_path / "charge.sock", owner=(nobody.pw_uid, nobody.pw_gid))
    try:
        as_user = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                   "--clear-groups", "--no-new-privs", "--bounding-set=-all", "--"]  # fmt: skip
        done = subprocess.run(
            [*as_user, sys.executable, "-c", _AS_USER, str(service.path), str(ledger.path)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": "/"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["charged"] == 7 and out["wrote"] != True  # noqa: E712
        assert ledger.usage().usage.lifetime_bytes == 7
    finally:
        service.close()
        ledger.close()
        shutil.rmtree(tmp_path)
