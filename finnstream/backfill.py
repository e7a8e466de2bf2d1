"""Self-healing: refill the gap ledger's slots from Finnhub's 1-minute candles.

At start-up and every `backfill.every_minutes`, a pass works through the ledger in bounded pages
(`PAGE_SLOTS` slots, ordered by symbol and minute), expanding downtime windows into slots a
chunk at a time, so memory and each step on the event loop stay small whatever the backlog.
Each page's slots are grouped into contiguous ranges per symbol and asked of `/stock/candle`
(resolution 1) at background priority, so quotes always go first through the shared limiter.
Slots with a bar become `candle` records; a slot still missing after `backfill.max_attempts`
becomes a `gap` record with its reason. The page's records are published, then handed to the
slot keeper, which lets a slot leave the ledger only once its record is delivered or spooled.

A 403 (free plan) turns backfill off once, loudly; from then on (and whenever
`backfill.enabled` is false) slots are published as `gap` records at once. A stop (the limiter
closed) ends the pass without counting an attempt against any slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from finnstream.batcher import split_batches
from finnstream.clock import MINUTE_S, Clock, minute_slot, unless
from finnstream.config import BackfillConfig
from finnstream.errors import CandlesForbidden, DeadlinePassed, FinnstreamError
from finnstream.finnhub import FinnhubClient
from finnstream.kinesis import KinesisSink
from finnstream.ledger import Gap, LedgerError, Slot, ranges_by_symbol
from finnstream.limiter import LimiterClosed
from finnstream.metrics import Metrics
from finnstream.records import BadAnswer, Record, candle_record, gap_record
from finnstream.slots import SlotKeeper

log = structlog.get_logger("finnstream.backfill")

SETTLE_S = 2 * MINUTE_S  # a minute's candle is final a little after the minute ends
MAX_MINUTES_PER_REQUEST = 24 * 60  # one candle request covers at most a day of minutes
REQUEST_BUDGET_S = 150.0  # a candle request may wait this long for room beside the quotes
PUBLISH_BUDGET_S = 60.0  # a page's records may be retried this long, then they wait
PAGE_SLOTS = 2_000  # slots read, fetched, published and settled per step
EXPAND_BELOW = 20_000  # windows are expanded while fewer gap slots than this are open
EXPAND_CHUNK = 10_000
NO_CANDLES_REASON = "candles are not available on this Finnhub plan (403)"
TURNED_OFF_REASON = "backfill is turned off (backfill.enabled: false)"
NO_BAR_REASON = "no candle for this minute"
NO_ROOM_REASON = (
    "no room for candle requests: the quotes need the API key's whole limit "
    "(fewer symbols per key, or a higher plan, leaves room)"
)


class PassStopped(Exception):
    """The process is stopping: the pass ends without counting an attempt."""


@dataclass
class BackfillReport:
    candles: int = 0
    gaps: int = 0
    missing: int = 0
    undelivered: int = 0
    pages: int = 0
    resolved: int = 0  # slots that left the ledger
    errors: list[str] = field(default_factory=list)


def chunk_range(
    first: int, last: int, span: int = MAX_MINUTES_PER_REQUEST
) -> list[tuple[int, int]]:
    """[first, last] minute range in pieces of at most `span` minutes."""
    chunks = []
    step = span * MINUTE_S
    for start in range(first, last + MINUTE_S, step):
        chunks.append((start, min(last, start + step - MINUTE_S)))
    return chunks


@dataclass
class _Page:
    """One page's work: what to publish, and what to count against the slots left over."""

    records: list[Record] = field(default_factory=list)
    attempts: list[Slot] = field(default_factory=list)


class Backfiller:
    def __init__(
        self,
        client: FinnhubClient,
        keeper: SlotKeeper,
        sink: KinesisSink,
        cfg: BackfillConfig,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self._client = client
        self._keeper = keeper
        self._sink = sink
        self._cfg = cfg
        self._metrics = metrics
        self._clock = clock
        self.enabled = cfg.enabled
        self.off_reason = "" if cfg.enabled else TURNED_OFF_REASON
        self.passes = 0  # completed passes over the ledger
        self._passed = asyncio.Condition()

    def disable(self, why: str) -> None:
        if self.enabled:
            self.enabled = False
            self.off_reason = NO_CANDLES_REASON
            self._metrics.backfill_enabled.set(0)
            log.error(
                "backfill.disabled",
                reason=why,
                effect="missing minutes are published as gap records from now on",
            )

    async def loop(self, stop: asyncio.Event) -> None:
        """A full pass now and every `every_minutes`, until `stop`. While downtime windows are
        left and passes make progress, catch-up passes over fresh slots (no attempt made yet)
        run back to back in between, so a long backlog is worked off steadily while slots that
        failed wait for the next full pass before their next attempt."""
        interval = self._cfg.every_minutes * MINUTE_S
        next_full = self._clock.monotonic()
        while not stop.is_set():
            full = self._clock.monotonic() >= next_full
            report = await self.run_once(stop, fresh_only=not full)
            if full:
                next_full = self._clock.monotonic() + interval
                async with self._passed:
                    self.passes += 1
                    self._passed.notify_all()
            if report.resolved and self._keeper.ledger.window_slots:
                continue  # a backlog, and this pass made progress: go on at once
            await unless(stop, self._clock.sleep(next_full - self._clock.monotonic()))

    async def wait_passes(self, count: int) -> None:
        """Return once the background loop has completed `count` passes."""
        async with self._passed:
            await self._passed.wait_for(lambda: self.passes >= count)

    async def run_once(
        self, stop: asyncio.Event | None = None, *, fresh_only: bool = False
    ) -> BackfillReport:
        """One pass: every slot in the ledger that is old enough, page by page, after moving a
        bounded chunk of downtime windows into slots; `fresh_only`: slots not yet tried."""
        stop = stop or asyncio.Event()
        report = BackfillReport()
        horizon = minute_slot(self._clock.time()) - SETTLE_S
        after: Slot | None = None
        try:
            if self._keeper.ledger.gap_slots < EXPAND_BELOW:
                await asyncio.to_thread(self._keeper.expand, EXPAND_CHUNK)
            while not stop.is_set():
                page = await asyncio.to_thread(
                    self._keeper.page, after, horizon, PAGE_SLOTS, fresh_only=fresh_only
                )
                if not page:
                    break
                if report.pages == 0:
                    log.info("backfill.start", open_slots=self._keeper.ledger.count())
                after = (page[-1].symbol, page[-1].minute)
                await self._work(page, report)
                report.pages += 1
        except PassStopped:
            log.info("backfill.stopped", pages=report.pages)
        except LedgerError as exc:
            report.errors.append(str(exc))
            log.error("backfill.ledger_failed", error=str(exc), effect="retried next pass")
        if report.pages:
            log.info(
                "backfill.done",
                pages=report.pages,
                candles=report.candles,
                gaps=report.gaps,
                still_missing=report.missing - report.gaps,
                undelivered=report.undelivered,
            )
        return report

    async def _work(self, page: Sequence[Gap], report: BackfillReport) -> None:
        work = _Page()
        by_slot = {(g.symbol, g.minute): g for g in page}
        for symbol, ranges in ranges_by_symbol(page).items():
            for first, last in ranges:
                for lo, hi in chunk_range(first, last):
                    found, missing = await self._fetch(symbol, lo, hi, report)
                    work.records.extend(found)
                    report.missing += len(missing)
                    exhausted = [g for m in missing if self._exhausted(g := by_slot[(symbol, m)])]
                    work.attempts.extend((symbol, m) for m in missing)
                    work.records.extend(self._gap_records(exhausted))
                    report.gaps += len(exhausted)
        await self._publish(work, report)

    def _exhausted(self, gap: Gap) -> bool:
        return not self._can_fetch() or gap.attempts + 1 >= self._cfg.max_attempts

    def _can_fetch(self) -> bool:
        """Candles can be asked for: backfill is on and the quotes leave room on the key."""
        return self.enabled and self._client.background_room > 0

    def _gap_records(self, gaps: Sequence[Gap]) -> list[Record]:
        now = self._clock.time()
        why = self.off_reason if not self.enabled else NO_ROOM_REASON
        suffix = f"; {why}" if not self._can_fetch() else ""
        return [gap_record(g.symbol, g.minute, g.reason + suffix, now) for g in gaps]

    async def _fetch(
        self, symbol: str, lo: int, hi: int, report: BackfillReport
    ) -> tuple[list[Record], list[int]]:
        """Candle records for [lo, hi] of `symbol`, and the minutes that still have none.
        Minutes of a request that failed count as missing (an attempt); a stop raises."""
        wanted = range(lo, hi + MINUTE_S, MINUTE_S)
        if not self._can_fetch():
            return [], list(wanted)
        try:
            bars = await self._client.candles(
                symbol, lo, hi, self._clock.monotonic() + REQUEST_BUDGET_S
            )
        except LimiterClosed:
            raise PassStopped from None
        except DeadlinePassed:
            # Never sent (the quotes kept the key busy past its budget): not an attempt either.
            report.errors.append(f"{symbol}: waited too long behind the quotes")
            raise PassStopped from None
        except CandlesForbidden as exc:
            self.disable(str(exc))
            return [], list(wanted)
        except FinnstreamError as exc:
            report.errors.append(f"{symbol}: {exc}")
            log.warning("backfill.request_failed", symbol=symbol, first=lo, last=hi, error=str(exc))
            return [], list(wanted)
        found = self._records_from(symbol, bars, wanted)
        return list(found.values()), [m for m in wanted if m not in found]

    async def fetch_slots(
        self, symbol: str, slots: Sequence[int]
    ) -> tuple[list[Record], list[int]]:
        """Candle records for `slots` of one symbol (for `finnstream backfill`); raises
        `CandlesForbidden` on a free plan, since that command cannot do its job without candles."""
        records: list[Record] = []
        absent: list[int] = []
        for first, last in ranges_by_symbol([Gap(symbol, m, 0, "") for m in slots]).get(symbol, []):
            for lo, hi in chunk_range(first, last):
                bars = await self._client.candles(
                    symbol, lo, hi, self._clock.monotonic() + REQUEST_BUDGET_S
                )
                got = self._records_from(symbol, bars, range(lo, hi + MINUTE_S, MINUTE_S))
                records.extend(got.values())
                absent.extend(m for m in range(lo, hi + MINUTE_S, MINUTE_S) if m not in got)
        return records, absent

    def _records_from(
        self, symbol: str, bars: list[dict[str, object]], wanted: range
    ) -> dict[int, Record]:
        fetched_at = self._clock.time()
        found: dict[int, Record] = {}
        for bar in bars:
            t = bar.get("t")
            if isinstance(t, bool) or not isinstance(t, int | float):
                continue
            try:
                minute = minute_slot(t)
            except (OverflowError, ValueError):  # inf, nan, or beyond any date
                continue
            if minute not in wanted:
                continue
            try:
                found[minute] = candle_record(symbol, minute, bar, fetched_at)
            except BadAnswer as exc:
                log.warning("backfill.bad_bar", symbol=symbol, minute=minute, error=str(exc))
        return found

    async def _publish(self, work: _Page, report: BackfillReport) -> None:
        """Deliver the page's records one batch at a time (background: live cycles keep the
        other connections), then settle them with the keeper."""
        undelivered: list[Record] = []
        deadline = self._clock.monotonic() + PUBLISH_BUDGET_S
        for batch in split_batches(work.records):
            undelivered.extend(await self._sink.put_batch(batch.records, deadline))
        refused = {id(r) for r in undelivered}
        delivered = [r for r in work.records if id(r) not in refused]
        report.undelivered += len(undelivered)
        report.candles += sum(1 for r in delivered if r.source == "candle")
        filled = {(r.symbol, r.minute) for r in work.records}
        attempts = [slot for slot in work.attempts if slot not in filled]
        heal = await asyncio.shield(
            asyncio.to_thread(self._keeper.heal, delivered, undelivered, attempts, NO_BAR_REASON)
        )
        report.resolved += heal.resolved
