"""Self-healing: refill the gap ledger's missing slots from Finnhub's 1-minute candles.

At start-up and every `backfill.every_minutes`, open gaps are grouped into contiguous ranges per
symbol and asked of `/stock/candle` (resolution 1) at background priority, so quotes always go
first through the shared limiter. A slot still missing after `backfill.max_attempts` becomes a
`gap` record with its reason. A 403 (free plan) turns backfill off once, loudly, and from then
on gaps are published as `gap` records at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from finnstream.clock import MINUTE_S, Clock, minute_slot, unless
from finnstream.config import BackfillConfig
from finnstream.errors import CandlesForbidden, FinnstreamError
from finnstream.finnhub import FinnhubClient
from finnstream.kinesis import KinesisSink
from finnstream.ledger import Gap, GapLedger, ranges_by_symbol
from finnstream.metrics import Metrics
from finnstream.records import BadAnswer, Record, candle_record, gap_record

log = structlog.get_logger("finnstream.backfill")

SETTLE_S = 2 * MINUTE_S  # a minute's candle is final a little after the minute ends
MAX_MINUTES_PER_REQUEST = 24 * 60  # one candle request covers at most a day of minutes
REQUEST_BUDGET_S = 30.0
NO_CANDLES_REASON = "candles are not available on this Finnhub plan (403)"
TURNED_OFF_REASON = "backfill is turned off (backfill.enabled: false)"


@dataclass
class BackfillReport:
    candles: int = 0
    gaps: int = 0
    missing: int = 0
    undelivered: int = 0
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


class Backfiller:
    def __init__(
        self,
        client: FinnhubClient,
        ledger: GapLedger,
        sink: KinesisSink,
        cfg: BackfillConfig,
        metrics: Metrics,
        clock: Clock,
        on_spool: Callable[[Sequence[Record]], None] | None = None,
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._sink = sink
        self._cfg = cfg
        self._metrics = metrics
        self._clock = clock
        self.enabled = cfg.enabled
        self.off_reason = "" if cfg.enabled else TURNED_OFF_REASON
        self.passes = 0  # completed passes over the ledger
        self._passed = asyncio.Condition()
        self._on_spool = on_spool

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
        """Work through the ledger now and every `every_minutes`, until `stop`."""
        while not stop.is_set():
            await self.run_once()
            async with self._passed:
                self.passes += 1
                self._passed.notify_all()
            await unless(stop, self._clock.sleep(self._cfg.every_minutes * MINUTE_S))

    async def wait_passes(self, count: int) -> None:
        """Return once the background loop has completed `count` passes."""
        async with self._passed:
            await self._passed.wait_for(lambda: self.passes >= count)

    async def run_once(self) -> BackfillReport:
        report = BackfillReport()
        horizon = minute_slot(self._clock.time()) - SETTLE_S
        gaps = [g for g in await asyncio.to_thread(self._ledger.open_gaps) if g.minute <= horizon]
        if not gaps:
            return report
        log.info("backfill.start", gaps=len(gaps), symbols=len({g.symbol for g in gaps}))
        records: list[Record] = []
        exhausted: list[Gap] = []
        if self.enabled:
            by_slot = {(g.symbol, g.minute): g for g in gaps}
            for symbol, ranges in ranges_by_symbol(gaps).items():
                for first, last in ranges:
                    for lo, hi in chunk_range(first, last):
                        got, missing = await self._fetch(symbol, lo, hi, report)
                        records.extend(got)
                        report.missing += len(missing)
                        await asyncio.to_thread(
                            self._ledger.record_attempt,
                            [(symbol, m) for m in missing],
                            "no candle for this minute",
                        )
                        exhausted.extend(
                            g
                            for m in missing
                            if (g := by_slot[(symbol, m)]).attempts + 1 >= self._cfg.max_attempts
                        )
                        if not self.enabled:
                            break
        if not self.enabled:
            done = {(r.symbol, r.minute) for r in records}
            exhausted = [g for g in gaps if (g.symbol, g.minute) not in done]
        now = self._clock.time()
        for gap in exhausted:
            reason = gap.reason if self.enabled else f"{gap.reason}; {self.off_reason}"
            records.append(gap_record(gap.symbol, gap.minute, reason, now))
        report.gaps = len(exhausted)
        await self._publish(records, report)
        log.info(
            "backfill.done",
            candles=report.candles,
            gaps=report.gaps,
            still_missing=report.missing - report.gaps,
            undelivered=report.undelivered,
        )
        return report

    async def _fetch(
        self, symbol: str, lo: int, hi: int, report: BackfillReport
    ) -> tuple[list[Record], list[int]]:
        wanted = range(lo, hi + MINUTE_S, MINUTE_S)
        if not self.enabled:
            return [], list(wanted)
        try:
            bars = await self._client.candles(
                symbol, lo, hi, self._clock.monotonic() + REQUEST_BUDGET_S
            )
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
            if not isinstance(t, int | float) or minute_slot(t) not in wanted:
                continue
            try:
                found[minute_slot(t)] = candle_record(symbol, minute_slot(t), bar, fetched_at)
            except BadAnswer as exc:
                log.warning(
                    "backfill.bad_bar", symbol=symbol, minute=minute_slot(t), error=str(exc)
                )
        return found

    async def _publish(self, records: list[Record], report: BackfillReport) -> None:
        if not records:
            return
        undelivered = await self._sink.put(records)
        undelivered_ids = {id(r) for r in undelivered}
        report.undelivered = len(undelivered)
        report.candles = sum(
            1 for r in records if r.source == "candle" and id(r) not in undelivered_ids
        )
        self._metrics.candles.inc(report.candles)
        self._metrics.gaps_published.inc(sum(1 for r in records if r.source == "gap"))
        # Delivered or spooled, each slot is now accounted for (a full spool hands it back).
        await asyncio.to_thread(self._ledger.resolve, [(r.symbol, r.minute) for r in records])
        if undelivered and self._on_spool is not None:
            await asyncio.to_thread(self._on_spool, undelivered)
