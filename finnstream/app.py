"""The one owner of the lifecycle: starts the parts in order, runs cycles, stops cleanly.

Start: spool and ledger, health, token, limiter and Finnhub client, Kinesis (stream checked),
token check. Run: the ticker queues minute slots; each cycle publishes its records while the
spool drains beside it; backfill works through the gap ledger in the background. Stop (SIGTERM):
no new request starts, answers in hand are published until a grace deadline, whatever is left is
spooled, then everything closes in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog
from aiobotocore.session import AioSession

from finnstream.backfill import Backfiller
from finnstream.clock import SYSTEM_CLOCK, Clock, minute_slot, unless
from finnstream.config import (
    Config,
    aws_endpoint,
    aws_region,
    minute_capacity,
    shard_symbols,
)
from finnstream.cycle import CycleOutcome, QuoteCycle
from finnstream.errors import EXIT_OK, EXIT_UNDELIVERED, ConfigError
from finnstream.finnhub import FinnhubClient
from finnstream.health import HealthServer, HealthState
from finnstream.kinesis import KinesisSink, Publisher
from finnstream.ledger import GapLedger
from finnstream.limiter import RateLimiter
from finnstream.metrics import Metrics
from finnstream.records import Record
from finnstream.schedule import (
    MAX_LOOKBACK_S,
    Tick,
    Ticker,
    cron_matches,
    fire_times,
    parse_cron,
)
from finnstream.secret import fetch_secret_token, load_token
from finnstream.spool import Spool, SpoolBatch

log = structlog.get_logger("finnstream.app")

STOP_PUBLISH_GRACE_S = 20.0  # after SIGTERM, sends may go on this long; ECS waits 30 s
DRAIN_BATCHES_PER_CYCLE = 20  # spool backlog sent beside each cycle (10,000 records)


@dataclass(frozen=True)
class CycleReport:
    minute: int
    symbols: int
    published: int
    delivered: int
    spooled: int
    failed: int
    unknown: int
    lag_s: float
    took_s: float
    on_time: bool  # started by its tick (not a catch-up for the minute already under way)


class App:
    def __init__(
        self,
        cfg: Config,
        *,
        clock: Clock = SYSTEM_CLOCK,
        environ: Mapping[str, str] | None = None,
        session: AioSession | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.environ = os.environ if environ is None else environ
        self.session = session or AioSession()
        self.metrics = Metrics()
        self.symbols = shard_symbols(cfg)
        self.region = aws_region(cfg, self.environ)
        self.health = HealthState(
            started_mono=clock.monotonic(), backfill_enabled=cfg.backfill.enabled
        )
        self.stopping = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()
        self._tasks: set[asyncio.Task[None]] = set()
        self._market_open: Callable[[int], bool] | None = None
        self.ticker: Ticker | None = None
        self.cycle_listeners: list[Callable[[CycleReport], None]] = []
        self.health_server: HealthServer | None = None

    # ---- start -------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        if not self.symbols:
            raise ConfigError(
                f"shard {cfg.shard.index} of {cfg.shard.count} holds none of the "
                f"{len(cfg.symbols)} symbols: use fewer shards"
            )
        self._warn_if_over_capacity()
        self.spool = await asyncio.to_thread(self._open_spool)
        self.ledger = await asyncio.to_thread(self._open_ledger)
        self._stack.callback(self.ledger.close)
        self._update_gauges()
        if cfg.health.port:
            self.health_server = HealthServer(self.health, self.metrics, self.clock.monotonic)
            await self.health_server.start(cfg.health.host, cfg.health.port)
            self._stack.push_async_callback(self.health_server.stop)
        token = await load_token(
            cfg.finnhub,
            self.session,
            region=self.region,
            endpoint_url=self._endpoint("secretsmanager"),
            environ=self.environ,
        )
        self.limiter = RateLimiter(
            cfg.finnhub.requests_per_second, cfg.finnhub.requests_per_minute, self.clock
        )
        refresh = None if token.source.startswith("env:") else self._reread_token
        self.client = FinnhubClient(
            cfg.finnhub.base_url,
            token.value,
            self.limiter,
            timeout_s=cfg.finnhub.timeout_s,
            retries=cfg.finnhub.retries,
            clock=self.clock,
            refresh_token=refresh,
        )
        self.client.open()
        self._stack.push_async_callback(self.client.close)
        self.sink = KinesisSink(
            cfg.kinesis.model_copy(
                update={"endpoint_url": self._endpoint("kinesis"), "region": self.region}
            ),
            self.session,
            self.metrics,
            clock=self.clock,
        )
        await self.sink.start()
        self._stack.push_async_callback(self.sink.close)
        await self.client.check_token(self.symbols[0])
        self.cycle = QuoteCycle(self.client, self.limiter, self.metrics, self.clock)
        self.backfiller = Backfiller(
            self.client,
            self.ledger,
            self.sink,
            cfg.backfill,
            self.metrics,
            self.clock,
            on_spool=self.spool_records,
        )
        self.health.ready = True
        log.info(
            "app.ready",
            symbols=len(self.symbols),
            shard=f"{cfg.shard.index}/{cfg.shard.count}",
            stream=cfg.kinesis.stream_name,
            spool_records=self.spool.depth_records,
            gaps_open=self.ledger.count(),
        )

    def _endpoint(self, service: str) -> str | None:
        return aws_endpoint(self.cfg, service, self.environ)

    def _open_spool(self) -> Spool:
        try:
            return Spool(self.cfg.spool.dir, self.cfg.spool.max_bytes)
        except OSError as exc:
            raise ConfigError(
                f"spool.dir {self.cfg.spool.dir} is not usable: {exc.strerror or exc}: "
                "point it at a writable directory"
            ) from None

    def _open_ledger(self) -> GapLedger:
        return GapLedger(self.cfg.spool.dir)

    def _warn_if_over_capacity(self) -> None:
        capacity = minute_capacity(self.cfg.finnhub)
        if len(self.symbols) > capacity:
            log.warning(
                "config.over_capacity",
                symbols=len(self.symbols),
                per_minute=capacity,
                cycle_s=round(len(self.symbols) / capacity * 60, 1),
                hint="a cycle will overrun its minute: raise the plan's limits or shard",
            )

    def _is_open_fn(self) -> Callable[[int], bool] | None:
        if not self.cfg.schedule.market_hours_only:
            return None
        if self._market_open is None:
            from finnstream.markets import MarketHours  # noqa: PLC0415 - pandas only when needed

            self._market_open = MarketHours().is_open
        return self._market_open

    async def _reread_token(self) -> str:
        return await fetch_secret_token(
            self.cfg.finnhub,
            self.session,
            region=self.region,
            endpoint_url=self._endpoint("secretsmanager"),
        )

    # ---- stop --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Signal-safe: only changes state. The run loop and the stop watcher react."""
        self.stopping.set()

    async def _stop_watcher(self) -> None:
        await self.stopping.wait()
        log.info("app.stopping", grace_s=STOP_PUBLISH_GRACE_S)
        if hasattr(self, "limiter"):
            self.limiter.close()
        if self.ticker is not None:
            self.ticker.stop()
        await self.clock.sleep(STOP_PUBLISH_GRACE_S)
        self._hard_stop.set()

    async def close(self) -> None:
        """Idempotent: cancels background work, closes parts in reverse order."""
        self.stopping.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.ticker is not None:
            self.ticker.stop()
        await self._stack.aclose()

    async def __aenter__(self) -> App:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._supervise)
        return task

    def _supervise(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            log.error("app.task_crashed", task=task.get_name(), error=repr(exc))
            self.health.problems.append(f"{task.get_name()} crashed: {exc!r}")
            self.request_stop()

    # ---- run ---------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Drain the spool, one cycle for the current slot, flush; 0 only if all was delivered."""
        self._spawn(self._stop_watcher(), "stop-watcher")
        now = self.clock.time()
        minute = minute_slot(now)
        await asyncio.to_thread(self._ledger_downtime, minute)
        spool_empty = await self.drain_spool(max_batches=None)
        is_open = self._is_open_fn()
        if is_open is not None and not is_open(minute):
            log.info("cycle.market_closed", minute=minute)
            return EXIT_OK if spool_empty else EXIT_UNDELIVERED
        undelivered = await self.run_cycle(
            minute, self.clock.monotonic() - (now - minute), drain=False, lag=False
        )
        spool_empty = spool_empty and self.spool.depth_records == 0
        complete = not undelivered and spool_empty and not self.stopping.is_set()
        return EXIT_OK if complete else EXIT_UNDELIVERED

    async def run_forever(self) -> int:
        """The daemon: a cycle per tick until `request_stop`."""
        self.ticker = Ticker(self.cfg.schedule.cron, clock=self.clock, is_open=self._is_open_fn())
        ticker = self.ticker
        self.health.scheduler_alive = lambda: ticker.alive
        self.health.scheduler_overdue = lambda: ticker.overdue(self.clock.time())
        self.health.ticks_waiting = ticker.pending
        self._spawn(self._stop_watcher(), "stop-watcher")
        now = self.clock.time()
        current = minute_slot(now)
        await asyncio.to_thread(self._ledger_downtime, current)
        self.ticker.start()
        if (
            cron_matches(self.ticker.trigger, current)
            and self.ledger.last_completed_slot() != current
        ):
            # Catch up on the minute we started in (a restart or deploy leaves no gap).
            self.ticker.fire(now, self.clock.monotonic(), catch_up=True)
        # Turned off, the loop still publishes the ledger's slots as `gap` records.
        self._spawn(self.backfiller.loop(self.stopping), "backfill")
        while not self.stopping.is_set():
            tick = await self._next_tick()
            if tick is None:
                break
            if self.ticker.pending():
                # A newer slot is already due: a late quote would be the wrong minute's price.
                await asyncio.to_thread(
                    self._skip, tick.minute, "a newer minute was due before this cycle could start"
                )
                continue
            await self.run_cycle(
                tick.minute,
                tick.fired_mono - (tick.fired_wall - tick.minute),
                lag=not tick.catch_up,
            )
        log.info(
            "app.stopped", spool_records=self.spool.depth_records, problems=self.health.problems
        )
        return EXIT_UNDELIVERED if self.health.problems else EXIT_OK

    async def _next_tick(self) -> Tick | None:
        assert self.ticker is not None
        _, tick = await unless(self.stopping, self.ticker.next_tick())
        return tick

    def _skip(self, minute: int, reason: str) -> None:
        self.metrics.skipped_slots.labels(reason="late").inc()
        self.ledger.add([(s, minute) for s in self.symbols], reason)
        log.warning("cycle.skipped", minute=minute, reason=reason, symbols=len(self.symbols))
        self._update_gauges()

    def _ledger_downtime(self, current: int) -> None:
        """Slots no finnstream completed before `current` become gaps: a cycle cut short by a
        crash (SIGKILL), and every scheduled slot between the last completed one and now."""
        last = self.ledger.last_completed_slot()
        started = self.ledger.last_started_slot()
        if started is not None and (last is None or started > last) and started < current:
            added = self.ledger.add([(s, started) for s in self.symbols], "cycle was interrupted")
            log.warning("ledger.interrupted_cycle", minute=started, gaps_added=added)
        if last is not None and last < current - 60:
            self._ledger_not_running(last, current)
        self._update_gauges()

    def _ledger_not_running(self, last: int, current: int) -> None:
        start = max(last + 60, current - MAX_LOOKBACK_S)
        slots = fire_times(parse_cron(self.cfg.schedule.cron), start, current)
        is_open = self._is_open_fn()
        if is_open is not None:
            slots = [m for m in slots if is_open(m)]
        if slots:
            added = self.ledger.add(
                [(s, m) for m in slots for s in self.symbols], "finnstream was not running"
            )
            log.warning(
                "ledger.downtime",
                first=slots[0],
                last=slots[-1],
                slots=len(slots),
                gaps_added=added,
            )

    async def run_cycle(
        self, minute: int, tick_mono: float, *, drain: bool = True, lag: bool = True
    ) -> list[Record]:
        """One cycle for `minute`; returns the records that ended in the spool."""
        self.health.last_cycle_mono = self.clock.monotonic()
        self.metrics.last_cycle.set(minute)
        # Recorded beside the cycle, not before it: the first request must not wait on an fsync.
        started = asyncio.ensure_future(
            asyncio.to_thread(self.ledger.set_last_started_slot, minute)
        )
        publisher = Publisher(self.sink, self.clock)
        drainer = (
            asyncio.ensure_future(self.drain_spool(DRAIN_BATCHES_PER_CYCLE)) if drain else None
        )
        outcome = await self.cycle.run(minute, self.symbols, publisher, tick_mono)
        if lag:
            self.metrics.schedule_lag.observe(max(0.0, outcome.lag_s))
        undelivered = await self._finish(publisher)
        if drainer is not None:
            await drainer
        await started
        took = self.clock.monotonic() - tick_mono
        self.metrics.cycle_seconds.observe(took)
        await asyncio.shield(asyncio.to_thread(self._settle, outcome, undelivered))
        report = CycleReport(
            minute=minute,
            symbols=len(self.symbols),
            published=outcome.published,
            delivered=outcome.published - len(undelivered),
            spooled=len(undelivered),
            failed=len(outcome.failed),
            unknown=len(outcome.unknown),
            lag_s=outcome.lag_s,
            took_s=took,
            on_time=lag,
        )
        for listener in self.cycle_listeners:
            listener(report)
        fields = dataclasses.asdict(report)
        lag_s, took_s = fields.pop("lag_s"), fields.pop("took_s")
        fields.pop("on_time")
        log.info("cycle.done", **fields, lag_ms=round(lag_s * 1000, 1), took_s=round(took_s, 3))
        return undelivered

    async def _finish(self, publisher: Publisher) -> list[Record]:
        closed, undelivered = await unless(self._hard_stop, publisher.close())
        if closed and undelivered is not None:
            return undelivered
        log.warning("app.stop_deadline", action="spooling records still being sent")
        return await publisher.abort()

    def _settle(self, outcome: CycleOutcome, undelivered: Sequence[Record]) -> None:
        """Spool what was not delivered, ledger what could not be fetched, mark the slot done."""
        self.spool_records(undelivered)
        if outcome.published and self.ledger.count():
            # A slot re-polled after a crash is filled now: it is no longer a gap.
            failed = set(outcome.failed) | set(outcome.unknown)
            self.ledger.resolve([(s, outcome.minute) for s in self.symbols if s not in failed])
        if outcome.failed:
            for symbol, reason in outcome.failed.items():
                self.ledger.add([(symbol, outcome.minute)], reason)
        self.ledger.set_last_completed_slot(outcome.minute)
        self._update_gauges()

    def spool_records(self, records: Sequence[Record]) -> None:
        if not records:
            return
        result = self.spool.append(records)
        self.metrics.records_spooled.inc(len(result.written))
        if result.rejected:
            self.metrics.spool_rejected.inc(len(result.rejected))
            self.ledger.add(
                [(r.symbol, r.minute) for r in result.rejected if r.source != "gap"], "spool full"
            )
        self.health.spool_full = self.spool.full

    async def drain_spool(self, max_batches: int | None) -> bool:
        """Send spooled records oldest first; True when the spool is empty afterwards."""
        sent = 0
        while self.spool.depth_records and (max_batches is None or sent < max_batches):
            batch = await asyncio.to_thread(self._next_spool_batch)
            if batch is None:
                break
            undelivered = await self.sink.put_batch(batch.records)
            await asyncio.shield(asyncio.to_thread(self.spool.ack, batch, undelivered))
            sent += 1
            if undelivered:
                break  # Kinesis is not taking records: try again next cycle
        self._update_gauges()
        if sent:
            log.info("spool.drained", batches=sent, remaining=self.spool.depth_records)
        return self.spool.depth_records == 0

    def _next_spool_batch(self) -> SpoolBatch | None:
        return next(iter(self.spool.batches()), None)

    def _update_gauges(self) -> None:
        self.metrics.spool_depth.set(self.spool.depth_records)
        self.metrics.spool_bytes.set(self.spool.depth_bytes)
        self.metrics.gaps_open.set(self.ledger.count())
        backfiller = getattr(self, "backfiller", None)
        if backfiller is not None:
            self.health.backfill_enabled = backfiller.enabled
        self.metrics.backfill_enabled.set(1 if self.health.backfill_enabled else 0)
        client = getattr(self, "client", None)
        valid = client.token_valid if client is not None else True
        self.health.token_valid = valid
        self.metrics.token_valid.set(1 if valid else 0)

    # ---- backfill command ----------------------------------------------------------------------

    async def backfill_range(self, symbols: Sequence[str], start: int, end: int) -> int:
        """`finnstream backfill`: candle records for every minute slot in [start, end)."""
        first = -(-start // 60) * 60
        slots = list(range(first, end, 60))
        is_open = self._is_open_fn()
        if is_open is not None:
            slots = [m for m in slots if is_open(m)]
        if not slots:
            log.warning("backfill.nothing_to_do", start=start, end=end)
            return EXIT_OK
        total = published = missing = 0
        undelivered_all: list[Record] = []
        for n, symbol in enumerate(symbols, 1):
            if self.stopping.is_set():
                break
            records, absent = await self.backfiller.fetch_slots(symbol, slots)
            undelivered = await self.sink.put(records)
            undelivered_all.extend(undelivered)
            total += len(slots)
            published += len(records) - len(undelivered)
            missing += len(absent)
            log.info(
                "backfill.progress",
                symbol=symbol,
                done=f"{n}/{len(symbols)}",
                candles=len(records),
                missing=len(absent),
                slots=len(slots),
            )
        if undelivered_all:
            await asyncio.to_thread(self.spool_records, undelivered_all)
        log.info(
            "backfill.finished",
            symbols=len(symbols),
            slots=total,
            delivered=published,
            missing=missing,
            spooled=len(undelivered_all),
        )
        return EXIT_OK if not undelivered_all and not self.stopping.is_set() else EXIT_UNDELIVERED
