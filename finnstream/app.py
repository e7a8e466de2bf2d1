"""The one owner of the lifecycle: starts the parts in order, runs cycles, stops cleanly.

Start: health endpoint, token and Kinesis (checked before anything waits, so a broken setup
says so at once), the spool lock (a second process on the same `spool.dir` waits here as a
standby: alive, not ready, polling nothing), then spool, ledger and the slot keeper, and one
token check against Finnhub. Run: the ticker queues minute slots; each cycle publishes its
records and hands what is left to the slot keeper; the drainer and the backfiller work beside
it. Stop (SIGTERM): no new request starts, answers in hand are published until a grace
deadline, whatever is left is settled (spooled or ledgered), everything closes in reverse order
and the lock is released.

App orchestrates: which slot ends where is `SlotKeeper`'s decision (finnstream/slots.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiobotocore.session import AioSession

from finnstream.backfill import Backfiller
from finnstream.clock import SYSTEM_CLOCK, Clock, minute_slot, unless
from finnstream.config import Config, aws_endpoint, aws_region, minute_capacity, shard_symbols
from finnstream.cycle import QuoteCycle, split_over_capacity
from finnstream.drain import SpoolDrainer
from finnstream.emf import STANDBY_EVERY_S, EmfWriter
from finnstream.errors import EXIT_OK, EXIT_UNDELIVERED, ConfigError, SpoolLocked
from finnstream.finnhub import FinnhubClient
from finnstream.health import HealthServer, HealthState
from finnstream.kinesis import KinesisSink, Publisher
from finnstream.ledger import GapLedger, LedgerError
from finnstream.limiter import RateLimiter
from finnstream.lock import SpoolLock
from finnstream.metrics import Metrics
from finnstream.records import Record
from finnstream.schedule import Tick, Ticker
from finnstream.secret import fetch_secret_token, load_token
from finnstream.slots import Expected, Settlement, SlotKeeper
from finnstream.spool import Spool
from finnstream.transport import Transport

log = structlog.get_logger("finnstream.app")

STOP_PUBLISH_GRACE_S = 20.0  # after SIGTERM, sends may go on this long; ECS waits 30 s
STOP_EXIT_DEADLINE_S = 28.0  # the process exits by then whatever is stuck (a hung disk)
PUBLISH_WINDOW_S = 50.0  # a cycle's records may be retried until this far into its minute
PUBLISH_AT_LEAST_S = 8.0  # ... and a late cycle (a catch-up) at least this long, to 58 s at most
PUBLISH_CUTOFF_S = 58.0
RUN_ONCE_LOCK_WAIT_S = 30.0  # `run --once` waits this long for another process's lock
HOLDER_CHECK_S = 1.0  # a standby re-reads who holds the lock this often (it may change hands)
LAG_PROBE_S = 0.1
SKIPPED_REASON = "a newer minute was due before this cycle could start"
OVER_CAPACITY = "not polled: more symbols than the plan's pace fits a minute (see check-config)"


@dataclass(frozen=True)
class CycleReport:
    minute: int
    symbols: int
    published: int
    delivered: int
    undelivered: int  # Kinesis did not take them (by the publish deadline)
    spooled: int  # of those, in the spool now; the rest are in the ledger or held in memory
    failed: int
    unknown: int
    lag_s: float
    took_s: float  # from the cycle's own start to its records settled
    on_time: bool  # started by its tick (not a catch-up for the minute already under way)


@dataclass(frozen=True)
class Deps:
    """What a simulation swaps in; None means the real thing."""

    finnhub_transport: Transport | None = None
    kinesis_client: Any = None  # an open client with put_records / describe_stream_summary


class App:
    def __init__(
        self,
        cfg: Config,
        *,
        clock: Clock = SYSTEM_CLOCK,
        environ: Mapping[str, str] | None = None,
        session: AioSession | None = None,
        deps: Deps | None = None,
        exit_watchdog: bool = False,
        lock_wait_s: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.environ = os.environ if environ is None else environ
        self.session = session or AioSession()
        self.deps = deps or Deps()
        self.exit_watchdog = exit_watchdog
        self.lock_wait_s = lock_wait_s  # None: a standby waits until it is stopped
        self.metrics = Metrics()
        # CloudWatch metrics as log lines, for machines only (people read console logs).
        self.emf = (
            EmfWriter(self.metrics, cfg.kinesis.stream_name, cfg.shard.index)
            if cfg.log.format == "json"
            else None
        )
        self.symbols = shard_symbols(cfg)
        self.region = aws_region(cfg, self.environ)
        self.health = HealthState(
            started_mono=clock.monotonic(), backfill_enabled=cfg.backfill.enabled
        )
        self.lock = SpoolLock(cfg.spool.dir)
        self.active = False
        self.stopping = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()
        self._tasks: dict[asyncio.Task[None], None] = {}  # ordered: cancelled in start order
        self._market_open: Callable[[int], bool] | None = None
        self.ticker: Ticker | None = None
        self.cycle_listeners: list[Callable[[CycleReport], None]] = []
        self.health_server: HealthServer | None = None
        self._holder = ""  # standing by: who holds the spool lock, as it wrote it

    # ---- start -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every part. Waits for the spool lock (standby) up to `lock_wait_s` (None:
        until stopped); raises `SpoolLocked` when the wait runs out."""
        cfg = self.cfg
        if not self.symbols:
            raise ConfigError(
                f"shard {cfg.shard.index} of {cfg.shard.count} holds none of the "
                f"{len(cfg.symbols)} symbols: use fewer shards"
            )
        self._warn_if_over_capacity()
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
        self.sink = KinesisSink(
            cfg.kinesis.model_copy(
                update={"endpoint_url": self._endpoint("kinesis"), "region": self.region}
            ),
            self.session,
            self.metrics,
            clock=self.clock,
            client=self.deps.kinesis_client,
        )
        await self.sink.start()
        self._stack.push_async_callback(self.sink.close)
        self.limiter = RateLimiter(
            cfg.finnhub.requests_per_second, cfg.finnhub.requests_per_minute, self.clock
        )
        self.capacity = minute_capacity(cfg.finnhub)
        self.limiter.plan_quotes(min(len(self.symbols), self.capacity))
        refresh = None if token.source.startswith("env:") else self._reread_token
        self.client = FinnhubClient(
            cfg.finnhub.base_url,
            token.value,
            self.limiter,
            timeout_s=cfg.finnhub.timeout_s,
            retries=cfg.finnhub.retries,
            clock=self.clock,
            refresh_token=refresh,
            transport=self.deps.finnhub_transport,
        )
        self.client.open()
        self._stack.push_async_callback(self.client.close)
        if not await self._take_lock(self.lock_wait_s):
            return  # stopped while standing by
        self._stack.callback(self.lock.release)  # after the ledger and spool are closed
        await asyncio.to_thread(self._open_state)
        self._stack.callback(self.keeper.ledger.close)
        await self.client.check_token()
        self.cycle = QuoteCycle(self.client, self.limiter, self.metrics, self.clock)
        self.backfiller = Backfiller(
            self.client, self.keeper, self.sink, cfg.backfill, self.metrics, self.clock
        )
        self.drainer = SpoolDrainer(self.keeper.spool, self.sink, self.clock, self.metrics)
        self.active = True
        self.health.standby = None
        self.health.ready = True
        self.metrics.active.set(1)
        self._update_gauges()
        log.info(
            "app.ready",
            symbols=len(self.symbols),
            shard=f"{cfg.shard.index}/{cfg.shard.count}",
            stream=cfg.kinesis.stream_name,
            spool_records=self.keeper.spool.depth_records,
            gaps_open=self.keeper.ledger.count(),
            accounted_through=self.keeper.watermark,
        )

    async def _take_lock(self, wait_s: float | None) -> bool:
        if await asyncio.to_thread(self.lock.try_acquire):
            return True
        self.metrics.active.set(0)
        self._stand_by(await asyncio.to_thread(self.lock.holder))
        waited = self.clock.monotonic()
        watchers = [self._spawn(self._follow_holder(), "standby-holder")]
        if self.emf:
            watchers.append(self._spawn(self._standby_metrics(), "standby-metrics"))
        try:
            acquired = await self.lock.acquire(self.clock, self.stopping, wait_s)
        finally:
            for task in watchers:
                task.cancel()
        if acquired:
            log.warning("lock.taken_over", waited_s=round(self.clock.monotonic() - waited, 2))
            return True
        if self.stopping.is_set():
            return False
        holder = await asyncio.to_thread(self.lock.note) or self._holder
        raise SpoolLocked(
            f"another finnstream process ({holder}) holds the spool directory "
            f"{self.cfg.spool.dir}, and it was not released within {wait_s:.0f} s: only one "
            "process may poll per spool.dir (stop it, or give this run its own spool.dir)"
        )

    def _stand_by(self, holder: str) -> None:
        """Standing by while `holder` has the lock: said in the log (each time the lock changes
        hands, as when another standby took over) and in `/readyz`."""
        self._holder = holder
        self.health.standby = f"standby: {holder} holds the spool lock on {self.cfg.spool.dir}"
        log.warning("lock.standby", dir=str(self.cfg.spool.dir), holder=holder)

    async def _follow_holder(self) -> None:
        """While standing by: who holds the lock now (another standby may have taken it)."""
        while True:
            await self.clock.sleep(HOLDER_CHECK_S)
            note = await asyncio.to_thread(self.lock.note)
            if note and note != self._holder:  # "": the new holder is writing its note
                self._stand_by(note)

    async def _standby_metrics(self) -> None:
        """While standing by: a metrics line with only `Active` = 0, once a minute."""
        assert self.emf is not None
        while True:
            self.emf.standby(self.clock.time())
            await self.clock.sleep(STANDBY_EVERY_S)

    def _open_state(self) -> None:
        try:
            spool = Spool(self.cfg.spool.dir, self.cfg.spool.max_bytes)
        except OSError as exc:
            raise ConfigError(
                f"spool.dir {self.cfg.spool.dir} is not usable: {exc.strerror or exc}: "
                "point it at a writable directory"
            ) from None
        ledger = GapLedger(self.cfg.spool.dir)
        expected = Expected(self.cfg.schedule.cron, self._is_open_fn())
        self.keeper = SlotKeeper(spool, ledger, self.symbols, expected, self.metrics)

    @property
    def spool(self) -> Spool:
        return self.keeper.spool

    @property
    def ledger(self) -> GapLedger:
        return self.keeper.ledger

    def _endpoint(self, service: str) -> str | None:
        return aws_endpoint(self.cfg, service, self.environ)

    def _warn_if_over_capacity(self) -> None:
        capacity = minute_capacity(self.cfg.finnhub)
        if len(self.symbols) > capacity:
            log.warning(
                "config.over_capacity",
                symbols=len(self.symbols),
                fit_a_minute=capacity,
                effect=f"{len(self.symbols) - capacity} symbols a minute (a different slice each "
                "minute) are not polled and become gaps",
                hint="raise the plan's limits or split the symbols across shards (shard.count)",
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
        if self.exit_watchdog:
            _start_exit_watchdog(STOP_EXIT_DEADLINE_S)
        if hasattr(self, "limiter"):
            self.limiter.close()
        if self.ticker is not None:
            self.ticker.stop()
        await self.clock.sleep(STOP_PUBLISH_GRACE_S)
        self._hard_stop.set()

    async def close(self) -> None:
        """Idempotent: cancels background work, settles what is held, closes in reverse order."""
        self.stopping.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.ticker is not None:
            self.ticker.stop()
        if self.active:
            await asyncio.shield(asyncio.to_thread(self.keeper.flush))
            self.active = False
            self.metrics.active.set(0)
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
        self._tasks[task] = None
        task.add_done_callback(self._supervise)
        return task

    def _supervise(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            log.error("app.task_crashed", task=task.get_name(), error=repr(exc))
            self.health.problems.append(f"{task.get_name()} crashed: {exc!r}")
            self.request_stop()

    async def _watch_loop_lag(self) -> None:
        """How late a short sleep wakes: the longest event-loop stall, as a gauge."""
        worst = 0.0
        while True:
            before = self.clock.monotonic()
            await self.clock.sleep(LAG_PROBE_S)
            lag = self.clock.monotonic() - before - LAG_PROBE_S
            if lag > worst:
                worst = lag
                self.metrics.loop_lag.set(worst)

    # ---- run ---------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Drain the spool beside one cycle for the current slot, flush; 0 only if everything
        was delivered (what was not is in the spool or the ledger)."""
        if not self.active:
            return EXIT_UNDELIVERED
        self._spawn(self._stop_watcher(), "stop-watcher")
        minute = minute_slot(self.clock.time())
        await self._account_downtime(minute)
        draining = asyncio.ensure_future(self.drainer.drain_all(self.stopping))
        is_open = self._is_open_fn()
        report = None
        if is_open is not None and not is_open(minute):
            log.info("cycle.market_closed", minute=minute)
        else:
            report = await self.run_cycle(minute, observe_lag=False, metrics_line=False)
        await draining
        spool_empty = await self.drainer.drain_all(self.stopping)
        durable = await asyncio.to_thread(self.keeper.flush)
        self._update_gauges()
        if report is not None and self.emf is not None:
            self.emf.cycle(report)  # after the drain: this process writes no later line
        complete = spool_empty and durable and not self.stopping.is_set()
        return EXIT_OK if complete else EXIT_UNDELIVERED

    async def run_forever(self) -> int:
        """The daemon: a cycle per tick until `request_stop`."""
        if not self.active:
            log.info("app.stopped", standby=True)
            return EXIT_OK
        self._spawn(self._stop_watcher(), "stop-watcher")
        self._spawn(self._watch_loop_lag(), "loop-lag")  # from before the downtime is accounted
        self.ticker = Ticker(self.cfg.schedule.cron, clock=self.clock, is_open=self._is_open_fn())
        ticker = self.ticker
        self.health.scheduler_alive = lambda: ticker.alive
        self.health.scheduler_overdue = lambda: ticker.overdue(self.clock.time())
        self.health.ticks_waiting = ticker.pending
        ticker.start()  # first: no fire can fall between reading the clock and starting it
        current = minute_slot(self.clock.time())
        catch_up = await self._account_downtime(current)
        if catch_up:
            # The minute under way, as far as nobody polled it (a restart, a deploy, a takeover).
            ticker.fire(self.clock.time(), self.clock.monotonic(), catch_up=True)
        self._spawn(self.drainer.run(self.stopping), "spool-drainer")
        # Turned off, the loop still publishes the ledger's slots as `gap` records.
        self._spawn(self.backfiller.loop(self.stopping), "backfill")
        while not self.stopping.is_set():
            tick = await self._next_tick()
            if tick is None:
                break
            if ticker.pending():
                # A newer slot is already due: a late quote would be the wrong minute's price.
                await asyncio.shield(
                    asyncio.to_thread(self.keeper.skip, tick.minute, SKIPPED_REASON)
                )
                continue
            await self.run_cycle(
                tick.minute,
                observe_lag=not tick.catch_up,
                symbols=catch_up if tick.catch_up else None,
            )
        log.info(
            "app.stopped",
            spool_records=self.keeper.spool.depth_records,
            held_records=self.keeper.held_records,
            problems=self.health.problems,
        )
        return EXIT_UNDELIVERED if self.health.problems else EXIT_OK

    async def _account_downtime(self, current: int) -> list[str]:
        """Minutes since the watermark go into the ledger; returns the symbols a catch-up cycle
        for `current` polls (none: nothing of it is left to poll)."""
        try:
            return await asyncio.to_thread(self.keeper.account_downtime, current)
        except LedgerError as exc:
            # The first settle that works accounts for them (the watermark has not moved).
            log.error("ledger.downtime_not_recorded", error=str(exc))
            return list(self.symbols)

    async def _next_tick(self) -> Tick | None:
        assert self.ticker is not None
        _, tick = await unless(self.stopping, self.ticker.next_tick())
        return tick

    async def run_cycle(
        self,
        minute: int,
        *,
        observe_lag: bool = True,
        metrics_line: bool = True,
        symbols: Sequence[str] | None = None,
    ) -> CycleReport:
        """One cycle for `minute`: quotes of `symbols` (default: all) fetched and published, the
        rest settled; its metrics line written (json logs) unless `metrics_line` is False."""
        started = self.clock.monotonic()
        minute_mono = started - (self.clock.time() - minute)
        self.health.last_cycle_mono = started
        self.metrics.last_cycle.set(minute)
        publish_by = max(
            minute_mono + PUBLISH_WINDOW_S,
            min(minute_mono + PUBLISH_CUTOFF_S, started + PUBLISH_AT_LEAST_S),
        )
        publisher = Publisher(self.sink, self.clock, deadline=publish_by)
        polled, shed = split_over_capacity(
            self.symbols if symbols is None else symbols, self.capacity, minute
        )
        outcome = await self.cycle.run(minute, polled, publisher, minute_mono)
        if shed:
            self.metrics.quotes.labels(outcome="over_capacity").inc(len(shed))
            outcome.failed.update(dict.fromkeys(shed, OVER_CAPACITY))
        if observe_lag:
            self.metrics.schedule_lag.observe(max(0.0, outcome.lag_s))
        undelivered = await self._finish(publisher, publish_by)
        settlement = Settlement(
            minute,
            list(undelivered),
            dict(outcome.failed),
            # A catch-up may fill slots the process before it ledgered for this minute.
            filled=[] if observe_lag else _filled(polled, outcome.failed, outcome.unknown),
        )
        await asyncio.shield(asyncio.to_thread(self.keeper.settle, settlement))
        if undelivered:
            self.drainer.wake()
        took = self.clock.monotonic() - started
        self.metrics.cycle_seconds.observe(took)
        self._update_gauges()
        report = CycleReport(
            minute=minute,
            symbols=len(polled) + len(shed),  # a deploy's catch-up: what the stopped one left
            published=outcome.published,
            delivered=outcome.published - len(undelivered),
            undelivered=len(undelivered),
            spooled=settlement.written,
            failed=len(outcome.failed),
            unknown=len(outcome.unknown),
            lag_s=outcome.lag_s,
            took_s=took,
            on_time=observe_lag,
        )
        if metrics_line and self.emf is not None:
            self.emf.cycle(report)
        for listener in self.cycle_listeners:
            listener(report)
        fields = dataclasses.asdict(report)
        lag_s, took_s = fields.pop("lag_s"), fields.pop("took_s")
        fields.pop("on_time")
        log.info("cycle.done", **fields, lag_ms=round(lag_s * 1000, 1), took_s=round(took_s, 3))
        return report

    async def _finish(self, publisher: Publisher, publish_by: float) -> list[Record]:
        """The cycle's undelivered records, by `publish_by` (monotonic) at the latest: a send
        still in flight then (a Kinesis call hanging until its read timeout) is abandoned and
        its records settled as undelivered (they may have landed: at-least-once), so the next
        tick never waits on this minute. A stop's grace deadline cuts it short the same way."""
        closing = asyncio.ensure_future(publisher.close())
        stopped = asyncio.ensure_future(self._hard_stop.wait())
        timeout = max(0.0, publish_by - self.clock.monotonic())
        done, _ = await asyncio.wait(
            {closing, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        stopped.cancel()
        if closing in done:
            return closing.result()
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)  # a cancel of ours still propagates
        why = "stop deadline" if self._hard_stop.is_set() else "publish deadline"
        log.warning("cycle.send_abandoned", why=why, action="settling records still being sent")
        return await publisher.abort()

    def _update_gauges(self) -> None:
        self.metrics.spool_depth.set(self.keeper.spool.depth_records)
        self.metrics.spool_bytes.set(self.keeper.spool.depth_bytes)
        self.metrics.gaps_open.set(self.keeper.ledger.count())
        self.metrics.held_records.set(self.keeper.held_records)
        self.health.spool_full = self.keeper.spool.full
        self.health.held_records = self.keeper.held_records
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
        slots = list(range(-(-start // 60) * 60, end, 60))
        is_open = self._is_open_fn()
        if is_open is not None:
            slots = [m for m in slots if is_open(m)]
        if not slots:
            log.warning("backfill.nothing_to_do", start=start, end=end)
            return EXIT_OK
        total = published = missing = 0
        lost: list[Record] = []
        spooled = 0
        for n, symbol in enumerate(symbols, 1):
            if self.stopping.is_set():
                break
            records, absent = await self.backfiller.fetch_slots(symbol, slots)
            undelivered = await self.sink.put(records)
            if undelivered:
                refused = await asyncio.to_thread(self.keeper.spool_records, undelivered)
                spooled += len(undelivered) - len(refused)
                lost.extend(refused)
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
        if lost:
            log.error(
                "backfill.not_kept",
                records=len(lost),
                hint="Kinesis did not take them and the spool could not: run the command again",
            )
        log.info(
            "backfill.finished",
            symbols=len(symbols),
            slots=total,
            delivered=published,
            missing=missing,
            spooled=spooled,
        )
        complete = not spooled and not lost and not self.stopping.is_set()
        return EXIT_OK if complete else EXIT_UNDELIVERED


def _filled(polled: Sequence[str], failed: Mapping[str, str], unknown: Sequence[str]) -> list[str]:
    """Symbols whose quote a cycle delivered or spooled."""
    missing = {*failed, *unknown}
    return [s for s in polled if s not in missing]


def _start_exit_watchdog(seconds: float) -> None:
    """After a stop, the process ends within `seconds` even if a thread hangs (an NFS fsync that
    never returns): what is not settled by then is after the watermark, so nothing is lost."""

    def expire() -> None:
        log.error("app.exit_deadline", seconds=seconds, effect="exiting now")
        os._exit(EXIT_UNDELIVERED)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
