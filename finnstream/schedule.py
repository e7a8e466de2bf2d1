"""When a cycle runs, and which minute it belongs to.

APScheduler's AsyncIOScheduler fires a CronTrigger (UTC, second 0). The job does no work itself:
it decides the minute slot and hands it to a queue, so a long cycle never makes APScheduler skip
a run (`max_instances`), and the next tick simply waits for the cycle in progress. A slot that is
already a whole interval stale when its turn comes is not polled live (a late quote would be
the wrong minute's price); it goes to the gap ledger, counted, for backfill.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from finnstream.clock import MINUTE_S, SYSTEM_CLOCK, Clock, minute_slot

log = structlog.get_logger("finnstream.schedule")

MAX_LOOKBACK_S = 3 * 24 * 3600  # gaps older than this when starting up are not ledgered
MAX_PENDING_TICKS = 2


def parse_cron(expr: str) -> CronTrigger:
    """A 5-field UTC cron (minute hour day month weekday). Raises ValueError naming the problem."""
    try:
        return CronTrigger.from_crontab(expr, timezone=dt.UTC)
    except ValueError as exc:
        raise ValueError(f"{expr!r} is not a 5-field cron expression: {exc}") from None


def _utc(epoch: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC)


def cron_matches(trigger: CronTrigger, minute: int) -> bool:
    at = _utc(minute)
    return bool(trigger.get_next_fire_time(None, at) == at)


def fire_times(trigger: CronTrigger, start: int, end: int) -> list[int]:
    """Scheduled minute slots in [start, end)."""
    slots: list[int] = []
    at = _utc(minute_slot(start) if start % MINUTE_S == 0 else minute_slot(start) + MINUTE_S)
    nxt = trigger.get_next_fire_time(None, at)
    while nxt is not None and nxt.timestamp() < end:
        slots.append(int(nxt.timestamp()))
        nxt = trigger.get_next_fire_time(nxt, nxt + dt.timedelta(seconds=MINUTE_S))
    return slots


@dataclass(frozen=True)
class Tick:
    minute: int  # the slot: the scheduled fire time
    fired_mono: float  # monotonic clock when the job ran (lag = fired_wall - minute)
    fired_wall: float


class Ticker:
    """Turns cron fire times into `Tick`s on a queue; `next_tick` waits for the next one."""

    def __init__(
        self,
        cron: str,
        *,
        clock: Clock = SYSTEM_CLOCK,
        is_open: Callable[[int], bool] | None = None,
    ) -> None:
        self.trigger = parse_cron(cron)
        self._clock = clock
        self._is_open = is_open
        self._queue: asyncio.Queue[Tick] = asyncio.Queue()
        self._scheduler: AsyncIOScheduler | None = None
        self.interval_s = self._interval()

    def _interval(self) -> int:
        """The longest distance between two fire times over the next day (for health)."""
        now = minute_slot(self._clock.time())
        slots = fire_times(self.trigger, now, now + 24 * 3600)
        gaps = [b - a for a, b in itertools.pairwise(slots)]
        return max(gaps, default=MINUTE_S)

    def start(self) -> None:
        self._scheduler = AsyncIOScheduler(timezone=dt.UTC)
        self._scheduler.add_job(
            self._fire,
            self.trigger,
            id="cycle",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,  # run however late; the ledger accounts for any missed slot
        )
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self._scheduler = None

    @property
    def alive(self) -> bool:
        return self._scheduler is not None and self._scheduler.running

    async def _fire(self) -> None:
        self.fire(self._clock.time(), self._clock.monotonic())

    def fire(self, wall: float, mono: float) -> None:
        """Queue the slot that `wall` falls in (the job fires at second 0 of the slot)."""
        minute = minute_slot(wall)
        if self._is_open is not None and not self._is_open(minute):
            log.debug("schedule.market_closed", minute=minute)
            return
        self._queue.put_nowait(Tick(minute, mono, wall))

    async def next_tick(self) -> Tick:
        return await self._queue.get()

    def pending(self) -> int:
        return self._queue.qsize()
