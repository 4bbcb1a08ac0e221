"""Open a SQLite file so that every commit is durable (WAL, fsync on commit)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from uplimit.errors import ConfigError, LedgerError

# A busy file is normal (several links, one budget), so wait long for the lock; longer than
# this means whoever holds it is stuck: fail closed.
LOCK_WAIT_S = 60.0


def connect_durable(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are the caller's BEGIN/COMMIT) whose
    commits are fsync'd before they return (`journal_mode=WAL`, `synchronous=FULL`)."""
    if not path.parent.is_dir():
        raise ConfigError(f"directory {path.parent} does not exist")
    try:
        db = sqlite3.connect(
            path, timeout=LOCK_WAIT_S, isolation_level=None, check_same_thread=False
        )
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        db.execute("PRAGMA synchronous=FULL")
        sync = db.execute("PRAGMA synchronous").fetchone()[0]
    except sqlite3.Error as e:
        raise LedgerError(f"cannot open {path}: {e}") from e
    if mode.lower() != "wal" or sync != 2:
        db.close()
        raise LedgerError(f"{path} cannot be made durable (journal {mode}, synchronous {sync})")
    return db
