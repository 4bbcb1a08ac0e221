"""Several processes (links) charge one ledger's budget at once: it never overshoots."""

from __future__ import annotations

import json
import subprocess
import sys

from support.ledger import check_exhausted
from uplimit.link.budget import Budgets

_WORKER = """
import json, random, sys, time
from uplimit.errors import BudgetExhausted
from uplimit.link.ledger import open_ledger
where, name, seed, max_charge = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ledger = open_ledger(where, name=name, link=f"worker-{seed}")
rng, charged = random.Random(seed), []
print("ready", flush=True)
sys.stdin.readline()  # start together
while True:
    try:
        charged.append(ledger.charge(rng.randint(1, max_charge)).n_bytes)
    except BudgetExhausted:
        break
    # A pause, as a paced link makes between frames: SQLite's lock is not fair, and a process
    # charging in a tight loop would keep it from the others.
    time.sleep(rng.random() * 0.004)
print(json.dumps(charged))
"""


def test_processes_never_overshoot(ledger_target) -> None:
    """Several processes (links) charge one budget at once, each on its own connection."""
    budget, max_charge, n_procs = 60_000, 600, 4
    ledger = ledger_target.open(Budgets(budget))
    args = [ledger_target.where, ledger_target.name]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, *args, str(seed), str(max_charge)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(n_procs)
    ]
    for p in procs:
        assert p.stdout.readline() == "ready\n"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    receipts, got = [], []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        got.append(json.loads(out))
        receipts += got[-1]
    # SQLite's lock is not fair, so on a busy machine one process may be kept out throughout.
    assert sum(1 for mine in got if mine) >= 2, "processes really competed"
    check_exhausted(ledger, budget, receipts, max_charge)
    links = {c.link for c in ledger.charge_log()}
    assert links == {f"worker-{i}" for i, mine in enumerate(got) if mine}
