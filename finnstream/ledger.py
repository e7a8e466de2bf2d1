"""The gap ledger: which (symbol, minute) slots were expected and not delivered, and how far we got.

A small sqlite3 database at `<dir>/ledger.sqlite3` (WAL, `synchronous=FULL`), so a slot recorded
as missing survives a crash. Backfill works through `open_gaps()`, groups them with
`ranges_by_symbol()` into candle requests, and `resolve()`s what it filled; a slot that keeps
failing gets `record_attempt()`s until it is published as a `gap` record. `last_completed_slot`
is the newest minute whose cycle finished, so a restart knows which minutes it missed.

Bulk operations run as one `executemany` in one transaction. Every sqlite error comes out as a
`LedgerError` naming the file, never as a raw sqlite traceback.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import structlog

from finnstream.clock import MINUTE_S
from finnstream.errors import FinnstreamError

log = structlog.get_logger(__name__)

FILENAME = "ledger.sqlite3"
SCHEMA_VERSION = 1
_LAST_COMPLETED = "last_completed_slot"
_LAST_STARTED = "last_started_slot"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gaps (
    minute   INTEGER NOT NULL,
    symbol   TEXT    NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason   TEXT    NOT NULL,
    PRIMARY KEY (minute, symbol)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""


class LedgerError(FinnstreamError):
    """The gap ledger file cannot be opened, read or written."""


@dataclass(frozen=True, slots=True)
class Gap:
    """A slot expected and not delivered; `attempts` counts failed tries to fill it."""

    symbol: str
    minute: int
    attempts: int
    reason: str


def ranges_by_symbol(gaps: Sequence[Gap]) -> dict[str, list[tuple[int, int]]]:
    """Each symbol's gap minutes merged into contiguous [first, last] ranges (60 s apart).

    Symbols come in sorted order, ranges in ascending order; duplicate minutes are merged.
    """
    minutes: dict[str, set[int]] = defaultdict(set)
    for gap in gaps:
        minutes[gap.symbol].add(gap.minute)
    return {symbol: _contiguous(sorted(minutes[symbol])) for symbol in sorted(minutes)}


def _contiguous(minutes: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for minute in minutes:
        if ranges and minute - ranges[-1][1] == MINUTE_S:
            ranges[-1] = (ranges[-1][0], minute)
        else:
            ranges.append((minute, minute))
    return ranges


def _unique(slots: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    return list(dict.fromkeys((symbol, int(minute)) for symbol, minute in slots))


class GapLedger:
    """The gap ledger of one spool directory. Safe to call from worker threads (one lock)."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / FILENAME
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._setup(self._conn)
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise self._error("cannot be opened", exc) from exc
        log.info("ledger.opened", path=str(self.path), open_gaps=self.count())

    def _error(self, what: str, exc: BaseException) -> LedgerError:
        return LedgerError(
            f"The gap ledger {self.path} {what} ({exc}). If the file is corrupt, move it aside "
            "and restart: finnstream starts a new ledger (the gaps it held are not refilled)."
        )

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA busy_timeout = 5000")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.DatabaseError(f"journal_mode is {mode}, not wal")
        conn.execute("PRAGMA synchronous = FULL")
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {check}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version} is newer than this finnstream")
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, inside one transaction when `write`; errors named."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise LedgerError(f"The gap ledger {self.path} is closed.")
            try:
                if write:
                    conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    if write:
                        conn.execute("ROLLBACK")
                    raise
                if write:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._error("cannot be read or written", exc) from exc

    def add(self, slots: Iterable[tuple[str, int]], reason: str) -> int:
        """Record slots as missing; returns how many were new (existing ones are unchanged)."""
        rows = [(minute, symbol, reason) for symbol, minute in _unique(slots)]
        with self._transaction(write=True) as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT INTO gaps (minute, symbol, attempts, reason) VALUES (?, ?, 0, ?) "
                "ON CONFLICT (minute, symbol) DO NOTHING",
                rows,
            )
            added = conn.total_changes - before
        if added:
            log.info("ledger.gaps_added", added=added, reason=reason)
        return added

    def resolve(self, slots: Iterable[tuple[str, int]]) -> None:
        """Forget slots that were filled (delivered as quote, candle or gap record)."""
        rows = [(minute, symbol) for symbol, minute in _unique(slots)]
        with self._transaction(write=True) as conn:
            conn.executemany("DELETE FROM gaps WHERE minute = ? AND symbol = ?", rows)

    def record_attempt(self, slots: Iterable[tuple[str, int]], reason: str) -> None:
        """One more failed try for each slot already in the ledger (others are ignored)."""
        rows = [(reason, minute, symbol) for symbol, minute in _unique(slots)]
        with self._transaction(write=True) as conn:
            conn.executemany(
                "UPDATE gaps SET attempts = attempts + 1, reason = ? "
                "WHERE minute = ? AND symbol = ?",
                rows,
            )

    def open_gaps(self, *, limit: int | None = None) -> list[Gap]:
        """Open gaps ordered by minute, then symbol; at most `limit` of them."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT symbol, minute, attempts, reason FROM gaps ORDER BY minute, symbol LIMIT ?",
                (-1 if limit is None else max(0, limit),),
            ).fetchall()
        return [Gap(symbol, minute, attempts, reason) for symbol, minute, attempts, reason in rows]

    def count(self) -> int:
        """How many gaps are open."""
        with self._transaction(write=False) as conn:
            n: int = conn.execute("SELECT count(*) FROM gaps").fetchone()[0]
        return n

    def _get_meta(self, key: str) -> int | None:
        with self._transaction(write=False) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def _raise_meta(self, key: str, minute: int) -> None:
        """Move `key` forward to `minute` (an older minute changes nothing)."""
        with self._transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                (key, int(minute)),
            )

    def last_completed_slot(self) -> int | None:
        """The newest minute slot whose cycle completed, or None if none ever did."""
        return self._get_meta(_LAST_COMPLETED)

    def set_last_completed_slot(self, minute: int) -> None:
        """Move the last completed slot forward to `minute` (an older minute changes nothing)."""
        self._raise_meta(_LAST_COMPLETED, minute)

    def last_started_slot(self) -> int | None:
        """The newest minute slot whose cycle started (ahead of the completed one after a crash)."""
        return self._get_meta(_LAST_STARTED)

    def set_last_started_slot(self, minute: int) -> None:
        self._raise_meta(_LAST_STARTED, minute)

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> GapLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
