"""The one owner of a slot's fate: every expected (symbol, minute) slot ends in exactly one place.

A slot's life, and who may move it (nothing else moves it):

    expected (a cycle holds it in memory; the watermark still covers it)
      ├─► delivered
      ├─► spool  ──(drainer: Kinesis accepted it)──────────────────► delivered
      └─► ledger ──(backfiller: its candle or gap record delivered or spooled)─► released

The invariant: at every instant each expected slot is delivered, in the spool (fsynced), in the
gap ledger (committed), or after the watermark (`accounted_through`), which makes whoever runs
next put it in the ledger. Each state is durable before the previous one is released:

- the watermark passes a minute only in the same ledger transaction that records its failed
  slots and any earlier minutes that had no cycle, and only after its undelivered records are
  in the spool (`settle`);
- a ledger slot is resolved only after the record that replaces it is delivered or fsynced in
  the spool (`heal`); a record the spool refuses keeps its slot in the ledger;
- a spooled record is retired only after Kinesis accepted it, or after it was re-appended
  (`Spool.ack`, run by the drainer).

When the disk refuses (ENOSPC, EIO, a full spool), a settlement stays in memory, in minute
order, and is retried at every later settle; the watermark waits for it, so a crash meanwhile
loses nothing (the next start puts those minutes in a window). Memory is bounded: past
`MAX_HELD_SETTLEMENTS` minutes or `MAX_HELD_RECORDS` records, the oldest held minute drops its
records and is left to the watermark (its slots become a window once the disk takes writes
again: refilled from candles instead of spooled quotes). App orchestrates; this module decides.

Everything here is synchronous (sqlite and fsync): callers run it in a worker thread.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import structlog

from finnstream.clock import MINUTE_S
from finnstream.ledger import Gap, GapLedger, LedgerError, LedgerWrite, NewWindow, Slot
from finnstream.metrics import Metrics
from finnstream.records import Record
from finnstream.schedule import MAX_LOOKBACK_S, fire_times, parse_cron
from finnstream.spool import Spool, SpoolError

log = structlog.get_logger("finnstream.slots")

MAX_HELD_SETTLEMENTS = 30  # minutes kept in memory while the disk refuses writes
MAX_HELD_RECORDS = 100_000  # records kept in memory while the disk refuses writes
WINDOW_SPAN_MINUTES = 24 * 60  # a window expands at most a day of one symbol at a time

NOT_RUNNING = "finnstream was not running"
NO_CYCLE = "no cycle ran for this minute (the process was paused or the scheduler fired late)"
SPOOL_FULL = "Kinesis did not take the quote and the spool was full (spool.max_bytes)"
DISK_REFUSED = "the disk refused writes, so the minute's records could not be kept"
# A stop closed the limiter before these were asked for: a process that starts within the same
# minute (a deploy's standby) asks for them, and only them.
STOPPED_REASON = "stopped before the quote was requested"


class Expected:
    """Which minutes are expected: the cron schedule, and market hours when they apply."""

    def __init__(self, cron: str, is_open: Callable[[int], bool] | None = None) -> None:
        self._every_minute = cron.split() == ["*"] * 5
        self._trigger = parse_cron(cron)
        self._is_open = is_open

    def minutes(self, lo: int, hi: int, limit: int | None = None) -> list[int]:
        """Expected minutes in [lo, hi), ascending; the first `limit` of them."""
        first = -(-lo // MINUTE_S) * MINUTE_S
        candidates: Iterator[int]
        if self._every_minute:
            candidates = iter(range(first, hi, MINUTE_S))
        else:
            candidates = iter(fire_times(self._trigger, first, hi))
        if self._is_open is not None:
            is_open = self._is_open
            candidates = (m for m in candidates if is_open(m))
        return list(itertools.islice(candidates, limit))


@dataclass
class Settlement:
    """What a cycle (or a skipped minute) leaves behind for its minute."""

    minute: int
    undelivered: list[Record] = field(default_factory=list)  # to the spool
    failed: dict[str, str] = field(default_factory=dict)  # symbol -> reason: to the ledger
    spooled: bool = False  # the undelivered records are already durable in the spool
    written: int = 0  # how many of them the spool took (the rest went to the ledger)
    filled: list[str] = field(default_factory=list)  # symbols delivered or spooled: unledger


@dataclass(frozen=True)
class Heal:
    """What `heal` made of a backfill page's records."""

    resolved: int  # slots that left the ledger (their record delivered or spooled)
    kept: int  # slots that stay in the ledger (their record could not be made durable)


class SlotKeeper:
    def __init__(
        self,
        spool: Spool,
        ledger: GapLedger,
        symbols: Sequence[str],
        expected: Expected,
        metrics: Metrics | None = None,
    ) -> None:
        self.spool = spool
        self.ledger = ledger
        self.symbols = list(symbols)
        self.expected = expected
        self._metrics = metrics or Metrics()
        self._lock = threading.RLock()
        self._held: deque[Settlement] = deque()
        self._dropped: dict[int, str] = {}  # held minutes given up: their reason, for the window
        self.watermark = ledger.watermark()
        self.not_durable_since: float | None = None

    # ---- state -------------------------------------------------------------------------------

    @property
    def held_minutes(self) -> int:
        """Minutes whose settlement is still only in memory."""
        return len(self._held)

    @property
    def held_records(self) -> int:
        return sum(len(s.undelivered) for s in list(self._held))

    def accounted(self, minute: int) -> bool:
        """True when `minute` is at or before the watermark: its slots are accounted for."""
        return self.watermark is not None and minute <= self.watermark

    # ---- start-up ----------------------------------------------------------------------------

    def account_downtime(self, current: int) -> list[str]:
        """Before the first cycle of a run (or a takeover): every expected minute after the
        watermark and before `current` goes into a window. Returns the symbols a catch-up cycle
        for `current` polls: all of them when `current` is not accounted for yet (a restart, or a
        takeover from a process that died in it); those a stopped process ledgered before asking
        for them when it is (a deploy's takeover); else none. Raises `LedgerError`."""
        with self._lock:
            last = self.watermark
            if last is not None and last >= current:
                stopped = self.ledger.symbols_at(current, STOPPED_REASON)
                return [s for s in self.symbols if s in stopped]
            write = LedgerWrite(watermark=current - MINUTE_S)
            if last is not None and last < current - MINUTE_S:
                lo = last + MINUTE_S
                if current - lo > MAX_LOOKBACK_S:
                    lo = current - MAX_LOOKBACK_S
                    log.error(
                        "ledger.downtime_too_old",
                        first_not_accounted=last + MINUTE_S,
                        last_not_accounted=lo - MINUTE_S,
                        hint="minutes more than three days back are not refilled: run "
                        "`finnstream backfill` for them if they matter",
                    )
                write.windows = self._windows(lo, current, NOT_RUNNING)
            self.ledger.commit(write)
            _log_windows("ledger.downtime", write.windows)
            self.watermark = current - MINUTE_S if last is None else max(last, current - MINUTE_S)
            self._update_gauges()
            return list(self.symbols)

    def _windows(self, lo: int, hi: int, reason: str) -> list[NewWindow]:
        """One window per symbol per run of expected minutes in [lo, hi) sharing a reason."""
        minutes = self.expected.minutes(lo, hi)
        windows: list[NewWindow] = []
        for why, run in itertools.groupby(minutes, key=lambda m: self._dropped.get(m, reason)):
            group = list(run)
            windows.extend(
                NewWindow(symbol, group[0], group[-1], why, len(group)) for symbol in self.symbols
            )
        return windows

    # ---- cycles ------------------------------------------------------------------------------

    def settle(self, settlement: Settlement) -> bool:
        """Make a cycle's outcome durable and move the watermark past its minute (and past any
        earlier minute that had no cycle). True when nothing is left only in memory."""
        with self._lock:
            self._held.append(settlement)
            return self.flush()

    def skip(self, minute: int, reason: str) -> bool:
        """A minute that will not be polled: all its slots go to the ledger."""
        self._metrics.skipped_slots.labels(reason="late").inc()
        log.warning("cycle.skipped", minute=minute, reason=reason, symbols=len(self.symbols))
        return self.settle(Settlement(minute, failed=dict.fromkeys(self.symbols, reason)))

    def flush(self) -> bool:
        """Retry held settlements in minute order; True when none is left."""
        with self._lock:
            while self._held:
                try:
                    self._settle_one(self._held[0])
                except (SpoolError, LedgerError) as exc:
                    self._note_not_durable(exc)
                    break
                self._held.popleft()
            else:
                if self.not_durable_since is not None:
                    log.warning("slots.durable_again")
                self.not_durable_since = None
            self._bound_held()
            self._update_gauges()
            return not self._held

    def _settle_one(self, s: Settlement) -> None:
        write = LedgerWrite()
        if s.undelivered and not s.spooled:
            try:
                result = self.spool.append(s.undelivered)
            except SpoolError as exc:
                # Shed to the ledger for this try; the records stay held until one commit works.
                write.add_gaps(
                    ((r.symbol, r.minute) for r in s.undelivered),
                    f"the spool could not be written ({exc})",
                )
            else:
                s.spooled, s.written = True, len(result.written)
                self._metrics.records_spooled.inc(s.written)
                if result.rejected:
                    self._metrics.spool_rejected.inc(len(result.rejected))
                    for record in result.rejected:
                        s.failed[record.symbol] = SPOOL_FULL
        for reason, symbols in _by_reason(s.failed).items():
            write.add_gaps(((symbol, s.minute) for symbol in symbols), reason)
        if self.watermark is not None and self.watermark + MINUTE_S < s.minute:
            write.windows = self._windows(self.watermark + MINUTE_S, s.minute, NO_CYCLE)
        write.resolve = [(symbol, s.minute) for symbol in s.filled]
        write.watermark = s.minute
        self.ledger.commit(write)
        _log_windows("ledger.missed_minutes", write.windows)
        self.watermark = s.minute if self.watermark is None else max(self.watermark, s.minute)
        for minute in [m for m in self._dropped if m <= self.watermark]:
            del self._dropped[minute]

    def _note_not_durable(self, exc: Exception) -> None:
        first = self.not_durable_since is None
        if first:
            self.not_durable_since = self._held[0].minute
        (log.error if first else log.debug)(
            "slots.not_durable",
            error=str(exc),
            held_minutes=len(self._held),
            held_records=self.held_records,
            effect="kept in memory and retried every cycle; a restart refills them from candles",
        )

    def _bound_held(self) -> None:
        while len(self._held) > MAX_HELD_SETTLEMENTS or (
            len(self._held) > 1 and self.held_records > MAX_HELD_RECORDS
        ):
            dropped = self._held.popleft()
            self._dropped[dropped.minute] = DISK_REFUSED
            self._metrics.records_released.inc(len(dropped.undelivered))
            log.error(
                "slots.released_to_window",
                minute=dropped.minute,
                records=len(dropped.undelivered),
                effect="the minute becomes a gap window, refilled from candles",
            )

    # ---- spool -------------------------------------------------------------------------------

    def spool_records(self, records: Sequence[Record]) -> list[Record]:
        """Append to the spool; returns the records that are NOT durable (refused or failed).
        Used where the caller keeps the slot elsewhere until this succeeds."""
        if not records:
            return []
        try:
            result = self.spool.append(records)
        except SpoolError as exc:
            log.error("spool.write_failed", error=str(exc), records=len(records))
            return list(records)
        self._metrics.records_spooled.inc(len(result.written))
        self._metrics.spool_rejected.inc(len(result.rejected))
        return result.rejected

    # ---- backfill ----------------------------------------------------------------------------

    def heal(
        self,
        delivered: Sequence[Record],
        undelivered: Sequence[Record],
        attempts: Sequence[Slot] = (),
        attempt_reason: str = "",
    ) -> Heal:
        """A backfill page's outcome: slots whose candle or gap record was delivered, or is now
        in the spool, leave the ledger; `attempts` count one more failed try. Raises
        `LedgerError` (the page is then worked again later: at-least-once)."""
        not_durable = {id(r) for r in self.spool_records(undelivered)}
        durable = [r for r in undelivered if id(r) not in not_durable]
        write = LedgerWrite(resolve=[(r.symbol, r.minute) for r in (*delivered, *durable)])
        if attempts:
            write.attempts[attempt_reason] = list(attempts)
        with self._lock:
            self.ledger.commit(write)
            self._update_gauges()
        return Heal(resolved=len(delivered) + len(durable), kept=len(not_durable))

    def page(
        self, after: Slot | None, horizon: int, limit: int, *, fresh_only: bool = False
    ) -> list[Gap]:
        return self.ledger.page(after, horizon, limit, fresh_only=fresh_only)

    def expand(self, budget: int) -> int:
        """Move up to about `budget` slots from windows into gap slots, oldest windows first,
        at most a day of one symbol per window at a time. Returns how many moved."""
        moved = 0
        with self._lock:
            for window in self.ledger.windows(limit=budget):
                if moved >= budget:
                    break
                span = min(WINDOW_SPAN_MINUTES, max(1, budget - moved))
                minutes = self.expected.minutes(window.first, window.last + MINUTE_S, span)
                moved += self.ledger.expand_window(window, minutes)
            self._update_gauges()
        return moved

    def open_slots(self) -> Iterator[tuple[str, int, str]]:
        """Every (symbol, minute, reason) the ledger holds, windows expanded (for tools and
        tests: a long window yields many slots)."""
        for gap in self.ledger.open_gaps():
            yield gap.symbol, gap.minute, gap.reason
        for window in self.ledger.windows():
            for minute in self.expected.minutes(window.first, window.last + MINUTE_S):
                yield window.symbol, minute, window.reason

    def _update_gauges(self) -> None:
        self._metrics.gaps_open.set(self.ledger.count())
        self._metrics.held_records.set(self.held_records)


def _by_reason(failed: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for symbol, reason in failed.items():
        grouped.setdefault(reason, []).append(symbol)
    return grouped


def _log_windows(event: str, windows: Sequence[NewWindow]) -> None:
    if windows:
        log.warning(
            event,
            first=min(w.first for w in windows),
            last=max(w.last for w in windows),
            symbols=len({w.symbol for w in windows}),
            slots=sum(w.slots for w in windows),
        )
