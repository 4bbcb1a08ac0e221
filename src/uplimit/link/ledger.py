"""The durable upload ledger: every uplink byte is charged here before it is written.

Contract of `Ledger.charge(n_bytes, timing_bytes=..., note=...)`:

* One transaction checks every budget (`budget.decide`) and records the charge; the
  transaction is durable (fsync'd) before `charge` returns. The caller writes the bytes only
  after that, so a crash at any instant can leave bytes charged and unsent (over-charge), never
  sent and uncharged.
* Refused charges raise `BudgetExhausted` naming the budget. The first refusal latches the
  ledger: it is stored with the state, raises an alarm, and every later charge is refused, across
  restarts, until an operator calls `raise_budget` (audited: who, when, why, old and new).
* Concurrent chargers of one budget serialise on it, so the lifetime total can never pass the
  budget, not by one byte: SQLite takes the write lock first (`BEGIN IMMEDIATE`), PostgreSQL
  locks the budget's row (`SELECT ... FOR UPDATE`). The database itself also refuses a lifetime
  total above the budget (a CHECK constraint) should the code ever be wrong.

`SqliteLedger` keeps one link's budget in a file (WAL, `synchronous=FULL`: each commit is
fsync'd). `PostgresLedger` keeps named budgets that several links share (fsync must be on,
`synchronous_commit=on`). `open_ledger` picks one from a path or a `postgresql://` URL.

Times are unix seconds. SQLite uses `budget.steady_time` (the wall clock at start, carried by
the monotonic clock: no clock step moves a window while the process runs); PostgreSQL the
server's clock, so links sharing a budget agree on windows (`budget.Usage.at` keeps a step of it
from resetting or stalling a window). A clock can be injected for tests.
"""

from __future__ import annotations

import logging
import secrets
import socket
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, overload

from uplimit.errors import BudgetExhausted, ConfigError, LedgerError
from uplimit.link._sqlite import LOCK_WAIT_S, connect_durable
from uplimit.link.alarms import Alarm, AlarmHook
from uplimit.link.budget import Budgets, Limit, Usage, decide, steady_time

__all__ = [
    "Alarm",
    "BudgetChange",
    "ChargeReceipt",
    "ChargeRecord",
    "Ledger",
    "LedgerState",
    "PostgresLedger",
    "SqliteLedger",
    "init_ledger",
    "open_ledger",
    "open_served",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
INIT_COMMAND = "uplimit budget init"


@dataclass(frozen=True)
class ChargeReceipt:
    """A recorded charge; `lifetime_bytes` is the budget's total after it."""

    seq: int
    n_bytes: int  # bytes the caller will write
    timing_bytes: int  # timing-channel surcharge (never written)
    at: float
    lifetime_bytes: int
    remaining_bytes: int  # lifetime budget left


@dataclass(frozen=True)
class ChargeRecord:
    seq: int
    link: str
    at: float
    n_bytes: int
    timing_bytes: int
    note: str


@dataclass(frozen=True)
class LedgerState:
    """One budget's state; `wire_bytes + timing_bytes == usage.lifetime_bytes`."""

    name: str
    budgets: Budgets
    usage: Usage
    wire_bytes: int
    timing_bytes: int
    charges: int
    exhausted_by: Limit | None
    exhausted_at: float | None
    ledger_id: str = ""  # random, set when the budget was initialised (`init_ledger`)
    created_at: float = 0.0

    @property
    def remaining_bytes(self) -> int:
        return self.budgets.lifetime_bytes - self.usage.lifetime_bytes


@dataclass(frozen=True)
class BudgetChange:
    seq: int
    at: float
    who: str
    reason: str
    old: Budgets
    new: Budgets
    rearmed: Limit | None  # the latch this change cleared


class Ledger(Protocol):
    def charge(self, n_bytes: int, *, timing_bytes: int = 0, note: str = "") -> ChargeReceipt:
        """Check and durably record a charge, or raise `BudgetExhausted` (module doc)."""
        ...

    def usage(self) -> LedgerState: ...

    def raise_budget(self, budgets: Budgets, *, who: str, reason: str) -> BudgetChange:
        """Operator action: set new budgets and clear the latch; audited and alarmed."""
        ...

    def alarms(self) -> list[Alarm]: ...

    def budget_changes(self) -> list[BudgetChange]: ...

    def charge_log(self, last: int | None = None) -> list[ChargeRecord]: ...

    def close(self) -> None: ...


# One schema for both databases: BIGINT has INTEGER affinity in SQLite, DOUBLE PRECISION REAL.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS uplimit_budget (
    name TEXT PRIMARY KEY,
    lifetime_limit BIGINT NOT NULL CHECK (lifetime_limit >= 0),
    per_day_limit BIGINT CHECK (per_day_limit >= 0),
    per_second_limit BIGINT CHECK (per_second_limit >= 0),
    lifetime_bytes BIGINT NOT NULL DEFAULT 0,
    wire_bytes BIGINT NOT NULL DEFAULT 0,
    timing_bytes BIGINT NOT NULL DEFAULT 0,
    charges BIGINT NOT NULL DEFAULT 0,
    day BIGINT NOT NULL DEFAULT 0,
    day_bytes BIGINT NOT NULL DEFAULT 0,
    second BIGINT NOT NULL DEFAULT 0,
    second_bytes BIGINT NOT NULL DEFAULT 0,
    exhausted_by TEXT,
    exhausted_at DOUBLE PRECISION,
    ledger_id TEXT NOT NULL CHECK (length(ledger_id) = 32),
    created_at DOUBLE PRECISION NOT NULL,
    CHECK (lifetime_bytes <= lifetime_limit),
    CHECK (wire_bytes + timing_bytes = lifetime_bytes)
);
CREATE TABLE IF NOT EXISTS uplimit_charges (
    seq {id}, budget TEXT NOT NULL, link TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
    n_bytes BIGINT NOT NULL, timing_bytes BIGINT NOT NULL, note TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS uplimit_budget_changes (
    seq {id}, budget TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
    who TEXT NOT NULL, reason TEXT NOT NULL,
    old_lifetime BIGINT NOT NULL, old_per_day BIGINT, old_per_second BIGINT,
    new_lifetime BIGINT NOT NULL, new_per_day BIGINT, new_per_second BIGINT,
    rearmed TEXT
);
CREATE TABLE IF NOT EXISTS uplimit_alarms (
    seq {id}, budget TEXT NOT NULL, link TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL, message TEXT NOT NULL
)
"""

_STATE_COLUMNS = (
    "lifetime_limit, per_day_limit, per_second_limit, lifetime_bytes, wire_bytes, timing_bytes,"
    " charges, day, day_bytes, second, second_bytes, exhausted_by, exhausted_at, ledger_id,"
    " created_at"
)


def _limit_or_none(value: str | None) -> Limit | None:
    return Limit(value) if value is not None else None


def _state(name: str, row: Sequence[Any]) -> LedgerState:
    lim, per_day, per_s, life, wire, timing, charges, day, day_b, sec, sec_b, by, at, lid, t0 = row
    return LedgerState(
        name=name,
        budgets=Budgets(lim, per_day, per_s),
        usage=Usage(life, day, day_b, sec, sec_b),
        wire_bytes=wire,
        timing_bytes=timing,
        charges=charges,
        exhausted_by=_limit_or_none(by),
        exhausted_at=at,
        ledger_id=lid,
        created_at=t0,
    )


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _limits(b: Budgets) -> tuple[int, int | None, int | None]:
    return b.lifetime_bytes, b.per_day_bytes, b.per_second_bytes


def _fmt(n: int | None) -> str:
    return "none" if n is None else f"{n:,}"


def _describe(b: Budgets) -> str:
    return (
        f"lifetime {_fmt(b.lifetime_bytes)}, per day {_fmt(b.per_day_bytes)},"
        f" per second {_fmt(b.per_second_bytes)} bytes"
    )


Execute = Callable[[str, Sequence[Any]], Any]  # (sql with ? placeholders, params) -> cursor


class _SqlLedger(ABC):
    """The ledger logic, on any database that provides `_transaction` and `_now`."""

    _lock_row = ""  # appended to the state SELECT to lock the row (PostgreSQL)
    _schema_lock = ""  # run before creating the schema (PostgreSQL)
    _schema_extra: tuple[str, ...] = ()  # run after it (PostgreSQL: the budget guard)

    def __init__(self, *, name: str, link: str | None, on_alarm: AlarmHook | None) -> None:
        if not name:
            raise ConfigError("a budget needs a name")
        self.name = name
        self.link = link if link is not None else socket.gethostname()
        self._on_alarm = on_alarm
        self._lock = threading.Lock()  # one connection per ledger object; threads take turns

    # -- provided by each database --

    @abstractmethod
    def _transaction(self, *, write: bool = True) -> AbstractContextManager[Execute]:
        """A transaction (holding the database's write lock when `write`), committed on exit."""

    @abstractmethod
    def _now(self, execute: Execute) -> float:
        """Unix time for windows and records."""

    @abstractmethod
    def close(self) -> None: ...

    # -- shared --

    def __enter__(self) -> _SqlLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, budgets: Budgets | None, *, id_type: str, exclusive: bool) -> None:
        """Without `budgets` (serving), open an initialised budget and never create anything;
        with them, create the schema and the budget if absent (`_init_budget`)."""
        if budgets is None:
            try:
                with self._transaction(write=False) as execute:
                    self._read(execute, lock=False)
            except LedgerError as e:
                raise LedgerError(f"{e}; a ledger is created only by `{INIT_COMMAND}`") from e
            return
        with self._transaction() as execute:
            if self._schema_lock:
                execute(self._schema_lock, ())
            for statement in _SCHEMA.format(id=id_type).split(";"):
                execute(statement, ())
            for statement in self._schema_extra:
                execute(statement, ())
            self._init_budget(execute, budgets, exclusive=exclusive)

    def _init_budget(self, execute: Execute, budgets: Budgets, *, exclusive: bool) -> None:
        """Create this budget's row (a new random ledger id), or check the stored one matches
        `budgets`; `exclusive`: refuse one that exists (`init_ledger`)."""
        state = self._read(execute, lock=False, missing_ok=True)
        if state is None:
            charged = execute(
                "SELECT count(*) FROM uplimit_charges WHERE budget = ?", (self.name,)
            ).fetchone()[0]
            if charged:  # the row was deleted: re-creating it would reset the usage to 0
                raise LedgerError(
                    f"budget {self.name!r} is gone but {charged} charges to it are recorded:"
                    " the ledger was tampered with; refusing to re-create it"
                )
            now = self._now(execute)
            execute(
                "INSERT INTO uplimit_budget (name, lifetime_limit, per_day_limit,"
                " per_second_limit, ledger_id, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (self.name, *_limits(budgets), secrets.token_hex(16), now),
            )
            return
        if exclusive:
            raise ConfigError(
                f"budget {self.name!r} is already initialised (ledger id {state.ledger_id},"
                f" created {_iso(state.created_at)}); change it with `uplimit budget raise`"
            )
        if budgets != state.budgets:
            # Never change a budget on open: that would make a config edit an unlogged raise.
            raise ConfigError(
                f"ledger budget {self.name!r} is {_describe(state.budgets)}, not"
                f" {_describe(budgets)}; change it with raise_budget (an audited operator action)"
            )

    @overload
    def _read(self, execute: Execute, *, lock: bool) -> LedgerState: ...

    @overload
    def _read(self, execute: Execute, *, lock: bool, missing_ok: bool) -> LedgerState | None: ...

    def _read(
        self, execute: Execute, *, lock: bool, missing_ok: bool = False
    ) -> LedgerState | None:
        sql = f"SELECT {_STATE_COLUMNS} FROM uplimit_budget WHERE name = ?"
        row = execute(sql + (self._lock_row if lock else ""), (self.name,)).fetchone()
        if row is None:
            if missing_ok:
                return None
            raise LedgerError(
                f"budget {self.name!r} is missing from the ledger (never initialised with"
                " `uplimit budget init`, or deleted)"
            )
        return _state(self.name, row)

    def _alarm(self, execute: Execute, at: float, kind: str, message: str) -> Alarm:
        seq = execute(
            "INSERT INTO uplimit_alarms (budget, link, at, kind, message) VALUES (?, ?, ?, ?, ?)"
            " RETURNING seq",
            (self.name, self.link, at, kind, message),
        ).fetchone()[0]
        return Alarm(at, kind, message, link=self.link, seq=seq)

    def _raise_alarm(self, alarm: Alarm) -> None:
        """After commit: log it and tell the hook (which must not raise)."""
        log.error("ALARM %s on budget %r: %s", alarm.kind, self.name, alarm.message)
        if self._on_alarm is not None:
            self._on_alarm(alarm)

    def charge(self, n_bytes: int, *, timing_bytes: int = 0, note: str = "") -> ChargeReceipt:
        """Check and durably record a charge of `n_bytes + timing_bytes` (module doc)."""
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 0:
            raise ConfigError(f"n_bytes must be an int >= 0, got {n_bytes!r}")
        if isinstance(timing_bytes, bool) or not isinstance(timing_bytes, int) or timing_bytes < 0:
            raise ConfigError(f"timing_bytes must be an int >= 0, got {timing_bytes!r}")
        total = n_bytes + timing_bytes
        if total == 0:
            raise ConfigError("a charge must be at least one byte")
        alarm = None
        with self._lock, self._transaction() as execute:
            state = self._read(execute, lock=True)
            now = self._now(execute)
            latched = state.exhausted_by is not None
            decision = decide(state.budgets, state.usage, total, now)
            refused = state.exhausted_by if latched else decision.refused
            if refused is None:
                u = decision.usage
                execute(
                    "UPDATE uplimit_budget SET lifetime_bytes = ?, wire_bytes = wire_bytes + ?,"
                    " timing_bytes = timing_bytes + ?, charges = charges + 1,"
                    " day = ?, day_bytes = ?, second = ?, second_bytes = ? WHERE name = ?",
                    (
                        u.lifetime_bytes,
                        n_bytes,
                        timing_bytes,
                        u.day,
                        u.day_bytes,
                        u.second,
                        u.second_bytes,
                        self.name,
                    ),
                )
                seq = execute(
                    "INSERT INTO uplimit_charges (budget, link, at, n_bytes, timing_bytes, note)"
                    " VALUES (?, ?, ?, ?, ?, ?) RETURNING seq",
                    (self.name, self.link, now, n_bytes, timing_bytes, note),
                ).fetchone()[0]
            elif not latched:
                used = decision.usage.used(refused)
                message = (
                    f"upload budget exhausted: {refused.label} budget of"
                    f" {state.budgets.limit(refused):,} bytes, {used:,} used, refused a charge"
                    f" of {total:,} bytes ({note or 'no note'}); the uplink sends nothing more"
                    " until an operator raises the budget"
                )
                execute(
                    "UPDATE uplimit_budget SET exhausted_by = ?, exhausted_at = ? WHERE name = ?",
                    (refused.value, now, self.name),
                )
                alarm = self._alarm(execute, now, "budget-exhausted", message)
        if alarm is not None:
            self._raise_alarm(alarm)
            raise BudgetExhausted(alarm.message, limit=refused.value)
        if refused is not None:
            raise BudgetExhausted(
                f"upload budget exhausted ({refused.label} budget, since"
                f" {_iso(state.exhausted_at)}); an operator must raise the budget",
                limit=refused.value,
            )
        return ChargeReceipt(
            seq=seq,
            n_bytes=n_bytes,
            timing_bytes=timing_bytes,
            at=now,
            lifetime_bytes=u.lifetime_bytes,
            remaining_bytes=state.budgets.lifetime_bytes - u.lifetime_bytes,
        )

    def usage(self) -> LedgerState:
        with self._lock, self._transaction(write=False) as execute:
            return self._read(execute, lock=False)

    def raise_budget(self, budgets: Budgets, *, who: str, reason: str) -> BudgetChange:
        """Operator action: set `budgets` (raising or lowering) and clear the latch.

        Written to the audit table with who, when, why, old and new budgets, and raised as an
        alarm: raising a budget is the one way to let more out, so someone must see each one.
        """
        if not isinstance(budgets, Budgets):
            raise ConfigError(f"budgets must be Budgets, got {budgets!r}")
        if not who.strip() or not reason.strip():
            raise ConfigError("raising a budget needs who and why")
        with self._lock, self._transaction() as execute:
            state = self._read(execute, lock=True)
            if budgets.lifetime_bytes < state.usage.lifetime_bytes:
                raise ConfigError(
                    f"lifetime budget {budgets.lifetime_bytes:,} is below what is already"
                    f" charged ({state.usage.lifetime_bytes:,})"
                )
            now = self._now(execute)
            old = state.budgets
            execute(
                "UPDATE uplimit_budget SET lifetime_limit = ?, per_day_limit = ?,"
                " per_second_limit = ?, exhausted_by = NULL, exhausted_at = NULL WHERE name = ?",
                (*_limits(budgets), self.name),
            )
            rearmed = state.exhausted_by
            seq = execute(
                "INSERT INTO uplimit_budget_changes (budget, at, who, reason, old_lifetime,"
                " old_per_day, old_per_second, new_lifetime, new_per_day, new_per_second,"
                " rearmed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                (
                    self.name,
                    now,
                    who,
                    reason,
                    *_limits(old),
                    *_limits(budgets),
                    rearmed.value if rearmed else None,
                ),
            ).fetchone()[0]
            rearming = f", re-arming it after the {rearmed.label} budget ran out" if rearmed else ""
            message = (
                f"{who} changed the budget from {_describe(old)} to {_describe(budgets)}"
                f"{rearming}: {reason}"
            )
            alarm = self._alarm(execute, now, "budget-changed", message)
        self._raise_alarm(alarm)
        return BudgetChange(seq, now, who, reason, old, budgets, rearmed)

    def alarms(self) -> list[Alarm]:
        with self._lock, self._transaction(write=False) as execute:
            rows = execute(
                "SELECT seq, at, link, kind, message FROM uplimit_alarms WHERE budget = ?"
                " ORDER BY seq",
                (self.name,),
            ).fetchall()
        return [Alarm(at, kind, msg, link=link, seq=seq) for seq, at, link, kind, msg in rows]

    def budget_changes(self) -> list[BudgetChange]:
        with self._lock, self._transaction(write=False) as execute:
            rows = execute(
                "SELECT seq, at, who, reason, old_lifetime, old_per_day, old_per_second,"
                " new_lifetime, new_per_day, new_per_second, rearmed"
                " FROM uplimit_budget_changes WHERE budget = ? ORDER BY seq",
                (self.name,),
            ).fetchall()
        return [
            BudgetChange(
                r[0], r[1], r[2], r[3], Budgets(*r[4:7]), Budgets(*r[7:10]), _limit_or_none(r[10])
            )
            for r in rows
        ]

    def charge_log(self, last: int | None = None) -> list[ChargeRecord]:
        """Recorded charges in order; only the `last` ones if given."""
        sql = (
            "SELECT seq, link, at, n_bytes, timing_bytes, note FROM uplimit_charges"
            " WHERE budget = ? ORDER BY seq DESC"
        )
        params: tuple[Any, ...] = (self.name,)
        if last is not None:
            sql, params = sql + " LIMIT ?", (self.name, last)
        with self._lock, self._transaction(write=False) as execute:
            rows = execute(sql, params).fetchall()
        return [ChargeRecord(*r) for r in reversed(rows)]


class SqliteLedger(_SqlLedger):
    """One budget in a SQLite file: WAL journal, every commit fsync'd (`synchronous=FULL`).

    Safe to share between threads (one connection, used in turn) and between processes
    (each opens the file; `BEGIN IMMEDIATE` serialises the chargers).
    """

    def __init__(
        self,
        path: str | Path,
        budgets: Budgets | None = None,
        *,
        name: str = "link",
        link: str | None = None,
        clock: Clock | None = None,
        on_alarm: AlarmHook | None = None,
        exclusive: bool = False,
    ) -> None:
        super().__init__(name=name, link=link, on_alarm=on_alarm)
        self.path = Path(path)
        self._clock = clock or steady_time
        if budgets is None and not self.path.is_file():  # connecting would create it
            raise LedgerError(f"ledger {self.path} does not exist: create it with `{INIT_COMMAND}`")
        self._db = connect_durable(self.path)
        try:
            self._open(budgets, id_type="INTEGER PRIMARY KEY", exclusive=exclusive)
        except BaseException:
            self._db.close()
            raise

    @contextmanager
    def _transaction(self, *, write: bool = True) -> Iterator[Execute]:
        try:
            # IMMEDIATE takes the write lock before reading, so a charge decides on the latest
            # total; a plain BEGIN reads a snapshot (WAL) without blocking chargers.
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._db.execute
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            raise LedgerError(f"ledger {self.path}: {e}") from e

    def _now(self, execute: Execute) -> float:
        return self._clock()

    def close(self) -> None:
        self._db.close()


_SCHEMA_LOCK = int.from_bytes(b"uplimit")  # advisory lock key for schema creation

# PostgreSQL: a role that is not the ledger's owner (nor a member of its role) may only charge.
# It gets SELECT and UPDATE on the budget row (a charge locks and updates it) and INSERT on the
# charge and alarm logs (`PostgresLedger.grant_charger`); this trigger refuses any change that
# could let more out: budgets, the ledger id, usage going down (a window's too: within it, or
# moving back), a window started ahead of the server's clock (a day skipped to empty it), the
# latch cleared, a row inserted or deleted.
# No '%' or '?' in it: the statements go through the shared placeholder rewriting.
_PG_GUARD = (
    """CREATE OR REPLACE FUNCTION uplimit_budget_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_has_role(current_user, (SELECT tableowner FROM pg_catalog.pg_tables
            WHERE schemaname = TG_TABLE_SCHEMA AND tablename = TG_TABLE_NAME), 'MEMBER') THEN
        IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
        RETURN NEW;
    END IF;
    IF TG_OP <> 'UPDATE' THEN
        RAISE EXCEPTION 'uplimit: only the ledger''s owner creates or deletes budgets';
    END IF;
    IF (NEW.name, NEW.lifetime_limit, NEW.per_day_limit, NEW.per_second_limit, NEW.ledger_id,
        NEW.created_at) IS DISTINCT FROM (OLD.name, OLD.lifetime_limit, OLD.per_day_limit,
        OLD.per_second_limit, OLD.ledger_id, OLD.created_at) THEN
        RAISE EXCEPTION 'uplimit: only the ledger''s owner changes a budget';
    END IF;
    IF NEW.lifetime_bytes < OLD.lifetime_bytes OR NEW.wire_bytes < OLD.wire_bytes
        OR NEW.timing_bytes < OLD.timing_bytes OR NEW.charges < OLD.charges THEN
        RAISE EXCEPTION 'uplimit: a charge never lowers the usage';
    END IF;
    IF NEW.day_bytes < OLD.day_bytes AND NEW.day <= OLD.day
        OR NEW.second_bytes < OLD.second_bytes AND NEW.second = OLD.second THEN
        RAISE EXCEPTION 'uplimit: a charge never lowers a window''s usage';
    END IF;
    IF NEW.day > OLD.day AND NEW.day > floor(extract(epoch FROM clock_timestamp()) / 86400)
        OR NEW.second > OLD.second AND NEW.second > floor(extract(epoch FROM clock_timestamp()))
    THEN
        RAISE EXCEPTION 'uplimit: a window cannot start ahead of the server''s clock';
    END IF;
    IF OLD.exhausted_by IS NOT NULL AND (NEW.exhausted_by, NEW.exhausted_at)
        IS DISTINCT FROM (OLD.exhausted_by, OLD.exhausted_at) THEN
        RAISE EXCEPTION 'uplimit: only the ledger''s owner clears the latch';
    END IF;
    RETURN NEW;
END $$""",
    "CREATE OR REPLACE TRIGGER uplimit_budget_guard BEFORE INSERT OR UPDATE OR DELETE"
    " ON uplimit_budget FOR EACH ROW EXECUTE FUNCTION uplimit_budget_guard()",
)


class PostgresLedger(_SqlLedger):
    """Named budgets in PostgreSQL, shared by any number of links (processes, hosts).

    Each charge locks its budget's row (`SELECT ... FOR UPDATE`), decides, and commits with
    `synchronous_commit=on`; the server must run with `fsync=on` or the ledger refuses to open.
    Windows use the server's clock unless `clock` is given.
    """

    _lock_row = " FOR UPDATE"
    # Serialise schema creation: CREATE TABLE IF NOT EXISTS races between sessions.
    _schema_lock = f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})"
    _schema_extra = _PG_GUARD

    def __init__(
        self,
        url: str,
        budgets: Budgets | None = None,
        *,
        name: str = "global",
        link: str | None = None,
        clock: Clock | None = None,
        on_alarm: AlarmHook | None = None,
        exclusive: bool = False,
    ) -> None:
        super().__init__(name=name, link=link, on_alarm=on_alarm)
        try:
            import psycopg
        except ImportError as e:
            raise ConfigError("a PostgreSQL ledger needs psycopg: pip install 'psycopg'") from e
        self._psycopg = psycopg
        self._clock = clock
        self._sql: dict[str, str] = {}
        try:
            self._db = psycopg.connect(
                url, autocommit=True, connect_timeout=int(LOCK_WAIT_S), application_name="uplimit"
            )
            self._db.execute("SET synchronous_commit = on")
            self._db.execute(f"SET lock_timeout = '{int(LOCK_WAIT_S)}s'")
            fsync = self._db.execute("SHOW fsync").fetchone()[0]
        except psycopg.Error as e:
            raise LedgerError(f"cannot open PostgreSQL ledger: {e}") from e
        if fsync != "on":
            self._db.close()
            raise LedgerError("PostgreSQL runs with fsync=off: charges would not be durable")
        try:
            identity = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
            self._open(budgets, id_type=identity, exclusive=exclusive)
        except BaseException:
            self._db.close()
            raise

    def _execute(self, sql: str, params: Sequence[Any]) -> Any:
        if sql not in self._sql:
            self._sql[sql] = sql.replace("?", "%s")  # the shared SQL has no literal '?'
        return self._db.execute(self._sql[sql], params)

    @contextmanager
    def _transaction(self, *, write: bool = True) -> Iterator[Execute]:
        # Writers lock the budget's row themselves (`_lock_row`); reads see committed data.
        try:
            with self._db.transaction():
                yield self._execute
        except self._psycopg.Error as e:
            raise LedgerError(f"PostgreSQL ledger: {e}") from e

    def grant_charger(self, role: str) -> None:
        """Operator action: let `role` charge (and read) every budget of this database, and
        nothing else (`_PG_GUARD`): the inner host's role; raising stays with the owner."""
        from psycopg import sql

        who = sql.Identifier(role)
        grants = [
            "GRANT USAGE ON SCHEMA public TO {}",
            "GRANT SELECT, UPDATE ON uplimit_budget TO {}",
            "GRANT SELECT, INSERT ON uplimit_charges, uplimit_alarms TO {}",
            "GRANT SELECT ON uplimit_budget_changes TO {}",
            "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}",
        ]
        try:
            with self._lock, self._db.transaction():
                for grant in grants:
                    self._db.execute(sql.SQL(grant).format(who))
        except self._psycopg.Error as e:
            raise LedgerError(f"PostgreSQL ledger: granting {role!r}: {e}") from e

    def _now(self, execute: Execute) -> float:
        if self._clock is not None:
            return self._clock()
        return float(execute("SELECT extract(epoch FROM clock_timestamp())", ()).fetchone()[0])

    def close(self) -> None:
        self._db.close()


def open_ledger(where: str | Path, budgets: Budgets | None = None, **kwargs: Any) -> Ledger:
    """A `PostgresLedger` for a `postgresql://` (or `postgres://`) URL, else a `SqliteLedger`.

    Without `budgets` it opens an initialised budget or raises `LedgerError`; with them it
    creates the budget if absent (`init_ledger`, tests) or checks that they match."""
    text = str(where)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresLedger(text, budgets, **kwargs)
    return SqliteLedger(where, budgets, **kwargs)


def init_ledger(where: str | Path, budgets: Budgets, **kwargs: Any) -> LedgerState:
    """Create a budget (`uplimit budget init`): its limits, creation time and a random ledger
    id. Refuses one that exists, or whose row is gone while charges to it are recorded."""
    ledger = open_ledger(where, budgets, exclusive=True, **kwargs)
    try:
        return ledger.usage()
    finally:
        ledger.close()


def open_served(where: str | Path, budgets: Budgets, **kwargs: Any) -> Ledger:
    """The ledger a service charges: it must exist, be initialised and hold `budgets`.
    Anything else refuses to start with an ALARM line: serving never creates a ledger, so a
    deleted or swapped one cannot come back empty."""
    try:
        ledger = open_ledger(where, **kwargs)
    except LedgerError as e:
        log.error("ALARM ledger-unusable: %s", e)
        raise
    try:
        stored = ledger.usage().budgets
        if stored != budgets:
            raise ConfigError(
                f"ledger budget is {_describe(stored)}, the configuration says"
                f" {_describe(budgets)}; change it with `uplimit budget raise` (audited)"
            )
    except BaseException:
        ledger.close()
        raise
    return ledger
