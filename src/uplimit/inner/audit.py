"""The inner side's audit store: every generation, including what never leaves.

One row per generated candidate: the chosen one of each stream and the best-of-N losers, with
the request id, seed, prompt hash, sampling parameters, every generated token, how many were
uploaded and withheld, the scorer's score, timings and the bits its stream cost on the uplink.
Withheld reasoning is kept under a `withheld_id` that an operator can ask the outer side for
(an upload, charged like any other); operators inside read it with `uplimit audit`.

SQLite in WAL mode. A crash can lose the last records (synchronous=NORMAL): the audit store is
for operators, the ledger is what bounds uploads. The scheduler's thread writes, the frame
thread marks uploads, readers open their own connections: one lock serialises the writers.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from uplimit.errors import BackendError, ConfigError

__all__ = ["AuditStore", "GenerationRecord"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    stream_id INTEGER NOT NULL,
    candidate INTEGER NOT NULL,
    chosen INTEGER NOT NULL,
    kind TEXT NOT NULL,
    seed TEXT NOT NULL,
    prompt_sha256 TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    params TEXT NOT NULL,
    tokens TEXT NOT NULL,
    uploaded TEXT NOT NULL,
    withheld TEXT NOT NULL,
    withheld_id TEXT,
    text TEXT NOT NULL,
    score REAL,
    finish_reason TEXT NOT NULL,
    t_received REAL NOT NULL,
    t_started REAL,
    t_first_token REAL,
    t_done REAL,
    t_uploaded REAL,
    bits_uploaded REAL,
    gauge_id TEXT
);
CREATE INDEX IF NOT EXISTS generations_request ON generations (request_id);
CREATE INDEX IF NOT EXISTS generations_withheld ON generations (withheld_id);
"""


@dataclass
class GenerationRecord:
    request_id: str
    stream_id: int
    candidate: int
    chosen: bool
    kind: str  # "generate" | "retrieve"
    seed: int
    prompt_sha256: str
    prompt_tokens: int
    params: dict
    tokens: list[int]  # everything generated (or, for a retrieval, uploaded)
    uploaded: list[int]  # what the stream carries (empty for a loser)
    withheld: list[int]
    withheld_id: str | None
    text: str
    score: float | None
    finish_reason: str
    t_received: float
    gauge_id: str | None = None  # the serving copy's gauge (gauge/schedule.py); None: none
    t_started: float | None = None
    t_first_token: float | None = None
    t_done: float | None = None
    t_uploaded: float | None = None
    bits_uploaded: float | None = None
    id: int | None = field(default=None, compare=False)


_COLUMNS = (
    "request_id, stream_id, candidate, chosen, kind, seed, prompt_sha256, prompt_tokens, params,"
    " tokens, uploaded, withheld, withheld_id, text, score, finish_reason, t_received,"
    " t_started, t_first_token, t_done, t_uploaded, bits_uploaded, gauge_id"
)


def _row(r: GenerationRecord) -> tuple:
    return (
        r.request_id, r.stream_id, r.candidate, int(r.chosen), r.kind, str(r.seed),
        r.prompt_sha256, r.prompt_tokens, json.dumps(r.params, sort_keys=True),
        json.dumps(r.tokens), json.dumps(r.uploaded), json.dumps(r.withheld), r.withheld_id,
        r.text, r.score, r.finish_reason, r.t_received, r.t_started, r.t_first_token,
        r.t_done, r.t_uploaded, r.bits_uploaded, r.gauge_id,
    )  # fmt: skip


def _record(row: Sequence) -> GenerationRecord:
    (rid, request_id, stream_id, candidate, chosen, kind, seed, prompt_sha, prompt_tokens,
     params, tokens, uploaded, withheld, withheld_id, text, score, finish, t_recv, t_start,
     t_first, t_done, t_up, bits, gauge_id) = row  # fmt: skip
    return GenerationRecord(
        request_id, stream_id, candidate, bool(chosen), kind, int(seed), prompt_sha,
        prompt_tokens, json.loads(params), json.loads(tokens), json.loads(uploaded),
        json.loads(withheld), withheld_id, text, score, finish, t_recv, gauge_id, t_start,
        t_first, t_done, t_up, bits, id=rid,
    )  # fmt: skip


class AuditStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ConfigError(f"audit store directory {self.path.parent} does not exist")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(generations)")}
            if "gauge_id" not in columns:  # a store written before gauge rotation existed
                self._db.execute("ALTER TABLE generations ADD COLUMN gauge_id TEXT")
        except sqlite3.Error as e:
            raise BackendError(f"audit store {self.path}: {e}") from e

    def _execute(self, sql: str, params: Sequence = ()) -> sqlite3.Cursor:
        with self._lock:
            try:
                return self._db.execute(sql, params)
            except sqlite3.Error as e:
                raise BackendError(f"audit store {self.path}: {e}") from e

    def record(self, records: Sequence[GenerationRecord]) -> list[int]:
        """Insert one stream's candidates in one transaction; returns their row ids."""
        ids = []
        with self._lock:
            try:
                self._db.execute("BEGIN")
                for r in records:
                    cur = self._db.execute(
                        f"INSERT INTO generations ({_COLUMNS}) VALUES"
                        f" ({', '.join('?' * len(_row(r)))})",
                        _row(r),
                    )
                    r.id = cur.lastrowid
                    ids.append(cur.lastrowid)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK")
                raise BackendError(f"audit store {self.path}: {e}") from e
        return ids

    def mark_uploaded(self, row_id: int, bits: float, at: float) -> None:
        self._execute(
            "UPDATE generations SET bits_uploaded = ?, t_uploaded = ? WHERE id = ?",
            (bits, at, row_id),
        )

    def withheld(self, withheld_id: str) -> list[int] | None:
        """The reasoning tokens withheld under `withheld_id`, or None if there is no such id."""
        row = self._execute(
            "SELECT withheld FROM generations WHERE withheld_id = ? AND chosen = 1",
            (withheld_id,),
        ).fetchone()
        return None if row is None else json.loads(row[0])

    def query(
        self, *, request_id: str | None = None, withheld_id: str | None = None, last: int = 20
    ) -> list[GenerationRecord]:
        """Records of one request (every candidate), one withheld id, or the `last` ones."""
        select = f"SELECT id, {_COLUMNS} FROM generations"
        if request_id is not None:
            rows = self._execute(
                f"{select} WHERE request_id = ? ORDER BY stream_id, candidate", (request_id,)
            )
        elif withheld_id is not None:
            rows = self._execute(f"{select} WHERE withheld_id = ?", (withheld_id,))
        else:
            rows = self._execute(f"{select} ORDER BY id DESC LIMIT ?", (last,))
        return [_record(r) for r in rows.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()
