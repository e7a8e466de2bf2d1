"""The gap ledger: the durable record of expected slots that are not delivered yet.

A small sqlite3 database at `<dir>/ledger.sqlite3` holds three things:

- `gaps`: single (symbol, minute) slots that were expected and not delivered (a quote that failed
  after its retries, a skipped minute, a record the full spool refused), each with the number of
  failed tries to fill it from candles and the latest reason.
- `windows`: whole stretches of minutes with no cycle at all (finnstream was not running, was
  paused, or its disk was full), one row per symbol: `[first, last]` and a reason, standing
  for every expected minute in between. Three days of downtime at 1,800 symbols is 1,800 rows,
  not 7.8 million; the backfiller expands a window into `gaps` a bounded chunk at a time
  (`expand_window`), in the same transaction that shrinks it, so a slot is always in exactly
  one of the two.
- `meta.accounted_through`: the watermark. Every expected slot at or before it is delivered,
  in the spool, or in this ledger; slots after it are accounted for by whoever comes next (a
  restart puts them in a window). Only `SlotKeeper` moves it, and only forward.

Writes that belong together (a cycle's failed slots, the window of minutes it found missed,
and the new watermark; a backfill page's resolved slots and attempts) are one transaction:
`commit(LedgerWrite)`. Every sqlite error comes out as a `LedgerError` naming the file.

Journal mode is TRUNCATE with `synchronous=FULL`, not WAL: the spool directory may be on EFS
(NFS), where WAL's shared-memory index does not work, and one mode everywhere is one mode
tested. TRUNCATE rather than DELETE because on NFS a truncate is one round trip and a
create-then-unlink of the journal is several. Temporary tables live in memory, so a read-only
root filesystem is fine. Only the process holding the spool lock opens the ledger.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import structlog

from finnstream.clock import MINUTE_S
from finnstream.errors import FinnstreamError

log = structlog.get_logger(__name__)

FILENAME = "ledger.sqlite3"
SCHEMA_VERSION = 2
JOURNAL_MODE = "truncate"
_WATERMARK = "accounted_through"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gaps (
    symbol   TEXT    NOT NULL,
    minute   INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason   TEXT    NOT NULL,
    PRIMARY KEY (symbol, minute)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS windows (
    id     INTEGER PRIMARY KEY,
    symbol TEXT    NOT NULL,
    first  INTEGER NOT NULL,
    last   INTEGER NOT NULL,
    reason TEXT    NOT NULL,
    slots  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""

# Version 1 (finnstream 0.1.0): gaps keyed (minute, symbol), WAL, and the pair
# last_started_slot / last_completed_slot. Its gaps table is renamed away before the schema
# above is created, and copied over after. A started-but-not-completed minute is simply after
# the watermark, so only the completed one carries over.
_MIGRATE_V1_BEFORE = "ALTER TABLE gaps RENAME TO gaps_v1"
_MIGRATE_V1_AFTER = """
INSERT INTO gaps (symbol, minute, attempts, reason)
    SELECT symbol, minute, attempts, reason FROM gaps_v1;
DROP TABLE gaps_v1;
INSERT OR REPLACE INTO meta (key, value)
    SELECT 'accounted_through', value FROM meta WHERE key = 'last_completed_slot';
DELETE FROM meta WHERE key IN ('last_completed_slot', 'last_started_slot');
"""

Slot = tuple[str, int]  # (symbol, minute)


class LedgerError(FinnstreamError):
    """The gap ledger file cannot be opened, read or written."""


@dataclass(frozen=True, slots=True)
class Gap:
    """A slot expected and not delivered; `attempts` counts failed tries to fill it."""

    symbol: str
    minute: int
    attempts: int
    reason: str


@dataclass(frozen=True, slots=True)
class Window:
    """Every expected minute of `symbol` in [first, last] (`slots` of them), none polled."""

    id: int
    symbol: str
    first: int
    last: int
    reason: str
    slots: int


@dataclass(frozen=True, slots=True)
class NewWindow:
    symbol: str
    first: int
    last: int
    reason: str
    slots: int


@dataclass
class LedgerWrite:
    """Everything one transaction does; empty parts do nothing."""

    gaps: dict[str, list[Slot]] = field(default_factory=dict)  # reason -> new open slots
    windows: list[NewWindow] = field(default_factory=list)
    resolve: list[Slot] = field(default_factory=list)  # filled: forget (unless `gaps` has them)
    attempts: dict[str, list[Slot]] = field(default_factory=dict)  # reason -> one more try
    watermark: int | None = None  # move accounted_through forward to this minute

    def add_gaps(self, slots: Iterable[Slot], reason: str) -> None:
        self.gaps.setdefault(reason, []).extend(slots)

    def __bool__(self) -> bool:
        return bool(
            self.gaps or self.windows or self.resolve or self.attempts or self.watermark is not None
        )


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


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Each statement of `script` inside the caller's transaction (`executescript` would commit
    it first)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _unique(slots: Iterable[Slot]) -> list[Slot]:
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
            self._gap_count, self._window_slots = self._read_counts(self._conn)
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise self._error("cannot be opened", exc) from exc
        log.info(
            "ledger.opened",
            path=str(self.path),
            journal=JOURNAL_MODE,
            open_gaps=self._gap_count,
            window_slots=self._window_slots,
        )

    def _error(self, what: str, exc: BaseException) -> LedgerError:
        return LedgerError(
            f"The gap ledger {self.path} {what} ({exc}). If the file is corrupt, move it aside "
            "and restart: finnstream starts a new ledger (the gaps it held are not refilled)."
        )

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA busy_timeout = 5000")
        mode = conn.execute(f"PRAGMA journal_mode = {JOURNAL_MODE}").fetchone()[0]
        if str(mode).lower() != JOURNAL_MODE:
            raise sqlite3.DatabaseError(f"journal_mode is {mode}, not {JOURNAL_MODE}")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA temp_store = MEMORY")
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {check}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version} is newer than this finnstream")
        conn.execute("BEGIN IMMEDIATE")  # the migration and the schema: all or nothing
        try:
            if version == 1:
                conn.execute(_MIGRATE_V1_BEFORE)
            _run_script(conn, _SCHEMA)
            if version == 1:
                _run_script(conn, _MIGRATE_V1_AFTER)
                log.info("ledger.migrated", path=str(self.path), from_version=1)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _read_counts(conn: sqlite3.Connection) -> tuple[int, int]:
        gaps = conn.execute("SELECT count(*) FROM gaps").fetchone()[0]
        windows = conn.execute("SELECT coalesce(sum(slots), 0) FROM windows").fetchone()[0]
        return int(gaps), int(windows)

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
                    if write and conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                if write:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if write and conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise self._error("cannot be read or written", exc) from exc

    # ---- writes ------------------------------------------------------------------------------

    def commit(self, write: LedgerWrite) -> int:
        """Apply `write` in one transaction; returns how many new gap slots it opened."""
        if not write:
            return 0
        with self._transaction(write=True) as conn:
            before = conn.total_changes
            for reason, slots in write.gaps.items():
                conn.executemany(
                    "INSERT INTO gaps (symbol, minute, attempts, reason) VALUES (?, ?, 0, ?) "
                    "ON CONFLICT (symbol, minute) DO NOTHING",
                    [(s, m, reason) for s, m in _unique(slots)],
                )
            added = conn.total_changes - before
            before = conn.total_changes
            # A slot this same write ledgers (its record refused by the spool, say) is not filled,
            # whatever the caller thought: a gap wins over a resolve.
            ledgered = {(s, int(m)) for slots in write.gaps.values() for s, m in slots}
            resolve = [slot for slot in _unique(write.resolve) if slot not in ledgered]
            if resolve:
                conn.executemany("DELETE FROM gaps WHERE symbol = ? AND minute = ?", resolve)
            resolved = conn.total_changes - before
            for reason, slots in write.attempts.items():
                conn.executemany(
                    "UPDATE gaps SET attempts = attempts + 1, reason = ? "
                    "WHERE symbol = ? AND minute = ?",
                    [(reason, s, m) for s, m in _unique(slots)],
                )
            conn.executemany(
                "INSERT INTO windows (symbol, first, last, reason, slots) VALUES (?, ?, ?, ?, ?)",
                [(w.symbol, w.first, w.last, w.reason, w.slots) for w in write.windows],
            )
            if write.watermark is not None:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                    (_WATERMARK, int(write.watermark)),
                )
        self._gap_count += added - resolved
        self._window_slots += sum(w.slots for w in write.windows)
        if added:
            log.info("ledger.gaps_added", added=added, reasons=sorted(write.gaps))
        return added

    def add(self, slots: Iterable[Slot], reason: str) -> int:
        """Record slots as missing; returns how many were new (existing ones are unchanged)."""
        write = LedgerWrite()
        write.add_gaps(slots, reason)
        return self.commit(write)

    def resolve(self, slots: Iterable[Slot]) -> None:
        """Forget slots that were filled (delivered or spooled as quote, candle or gap record)."""
        self.commit(LedgerWrite(resolve=list(slots)))

    def record_attempt(self, slots: Iterable[Slot], reason: str) -> None:
        """One more failed try for each slot already in the ledger (others are ignored)."""
        self.commit(LedgerWrite(attempts={reason: list(slots)}))

    def expand_window(self, window: Window, minutes: Sequence[int]) -> int:
        """Move `minutes` (the window's earliest expected ones, ascending) into `gaps` and
        shrink the window past them, in one transaction; the window is deleted once nothing of
        it is left (or `minutes` is empty: nothing of it is expected any more). Returns how
        many slots were moved."""
        new_first = minutes[-1] + MINUTE_S if minutes else window.last + MINUTE_S
        rest = max(0, window.slots - len(minutes))
        done = new_first > window.last or rest == 0
        with self._transaction(write=True) as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT INTO gaps (symbol, minute, attempts, reason) VALUES (?, ?, 0, ?) "
                "ON CONFLICT (symbol, minute) DO NOTHING",
                [(window.symbol, m, window.reason) for m in minutes],
            )
            added = conn.total_changes - before
            if done:
                conn.execute("DELETE FROM windows WHERE id = ?", (window.id,))
            else:
                conn.execute(
                    "UPDATE windows SET first = ?, slots = ? WHERE id = ?",
                    (new_first, rest, window.id),
                )
        self._gap_count += added
        self._window_slots -= window.slots if done else window.slots - rest
        return added

    # ---- reads -------------------------------------------------------------------------------

    def page(
        self, after: Slot | None, horizon: int, limit: int, *, fresh_only: bool = False
    ) -> list[Gap]:
        """Open gaps at or before `horizon`, ordered by (symbol, minute), after `after`;
        `fresh_only`: only slots no attempt was made at yet."""
        symbol, minute = after if after is not None else ("", -(2**62))
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT symbol, minute, attempts, reason FROM gaps "
                "WHERE (symbol, minute) > (?, ?) AND minute <= ? AND attempts <= ? "
                "ORDER BY symbol, minute LIMIT ?",
                (symbol, minute, horizon, 0 if fresh_only else 2**62, max(0, limit)),
            ).fetchall()
        return [Gap(s, m, a, r) for s, m, a, r in rows]

    def symbols_at(self, minute: int, reason: str) -> set[str]:
        """Symbols with an open gap slot at `minute` ledgered for `reason`."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT symbol FROM gaps WHERE minute = ? AND reason = ?", (minute, reason)
            ).fetchall()
        return {symbol for (symbol,) in rows}

    def open_gaps(self, *, limit: int | None = None) -> list[Gap]:
        """Open gap slots (not windows) ordered by minute, then symbol; at most `limit`."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT symbol, minute, attempts, reason FROM gaps ORDER BY minute, symbol LIMIT ?",
                (-1 if limit is None else max(0, limit),),
            ).fetchall()
        return [Gap(s, m, a, r) for s, m, a, r in rows]

    def windows(self, *, limit: int | None = None) -> list[Window]:
        """Unexpanded windows, oldest first; at most `limit` of them."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT id, symbol, first, last, reason, slots FROM windows "
                "ORDER BY first, symbol, id LIMIT ?",
                (-1 if limit is None else max(0, limit),),
            ).fetchall()
        return [Window(*row) for row in rows]

    def count(self) -> int:
        """Open gap slots, windows included (kept in memory: no query)."""
        return self._gap_count + self._window_slots

    @property
    def gap_slots(self) -> int:
        """Open slots in `gaps` alone (the backfiller expands windows while this is low)."""
        return self._gap_count

    @property
    def window_slots(self) -> int:
        """Slots standing in unexpanded windows."""
        return self._window_slots

    def watermark(self) -> int | None:
        """`accounted_through`: every expected slot up to this minute is accounted for."""
        with self._transaction(write=False) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (_WATERMARK,)).fetchone()
        return None if row is None else int(row[0])

    # ---- lifecycle ---------------------------------------------------------------------------

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
