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
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

from finnstream.clock import MINUTE_S, SYSTEM_CLOCK, Clock, minute_slot

log = structlog.get_logger("finnstream.schedule")

MAX_LOOKBACK_S = 3 * 24 * 3600  # gaps older than this when starting up are not ledgered
# The scheduler may run its job a hair before second 0 by the float clock (it rounds to the
# microsecond): a fire this close to the next minute belongs to that minute, not the one ending.
FIRE_EARLY_S = 0.001


CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _crontab_day(token: str) -> int:
    name = token.strip().lower()[:3]
    if name in CRON_DAYS:
        return CRON_DAYS.index(name)
    if not token.isdigit() or not 0 <= int(token) <= 7:
        raise ValueError(f"day of week {token!r} is not 0-7 or a day name")
    return int(token) % 7


def _weekdays(field: str) -> str:
    """Crontab's day-of-week (0 or 7 = Sunday) as APScheduler day names (its 0 is Monday)."""
    if field == "*":
        return "*"
    days: set[int] = set()
    for part in field.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else None
        if step_text and step is None:
            raise ValueError(f"day of week step {step_text!r} is not a positive number")
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            lo, hi = span.split("-", 1)
            first, last = _crontab_day(lo), _crontab_day(hi)
            last = 7 if hi.strip() == "7" else last
            if last < first:
                raise ValueError(f"day of week range {span!r} runs backwards")
        else:
            first = last = _crontab_day(span)
        days.update(d % 7 for d in range(first, last + 1, step or 1))
    return ",".join(CRON_DAYS[d] for d in sorted(days))


# A schedule that fires at all fires within this many years: February 29th can be 8 years apart
# (2096, then 2104) and a day of the month on a given weekday 11 or 12.
FIRE_HORIZON_YEARS = 12


def _restricted(field: str) -> bool:
    """crontab(5): a day field is restricted unless it starts with `*` (so `*/2` is not)."""
    return not field.startswith("*")


def parse_cron(expr: str) -> BaseTrigger:
    """A 5-field UTC cron (minute hour day month weekday), with crontab's meaning.

    Weekday numbers are crontab's (0 and 7 are Sunday). When both the day of the month and the
    day of the week are restricted, a minute matches if either does (`0 12 1 * 1`: noon on the
    1st and on every Monday); otherwise both must. Raises ValueError naming the problem, also
    for an expression that never fires (`* * 31 2 *`).
    """
    fields = expr.split()
    try:
        if len(fields) != 5:
            raise ValueError(f"it has {len(fields)} fields, not 5 (minute hour day month weekday)")
        minute, hour, day, month, weekday = fields

        def cron(day: str, weekday: str, **bounds: str) -> CronTrigger:
            return CronTrigger(
                minute=minute,
                hour=hour,
                day=day,
                month=month,
                day_of_week=_weekdays(weekday),
                timezone=dt.UTC,
                **bounds,
            )

        either = _restricted(day) and _restricted(weekday)
        days = [(day, "*"), ("*", weekday)] if either else [(day, weekday)]
        parts = [cron(d, w) for d, w in days]
        now = dt.datetime.now(dt.UTC)
        soon = f"{now.year}-{now.year + FIRE_HORIZON_YEARS}"  # bounds the search: fast either way
        if all(cron(d, w, year=soon).get_next_fire_time(None, now) is None for d, w in days):
            raise ValueError(
                f"it never fires: no minute matches it in the next {FIRE_HORIZON_YEARS} years "
                f"(does the month have that day?)"
            )
    except ValueError as exc:
        raise ValueError(f"{expr!r} is not a valid 5-field cron expression: {exc}") from None
    return parts[0] if len(parts) == 1 else OrTrigger(parts)


def _utc(epoch: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC)


def cron_matches(trigger: BaseTrigger, minute: int) -> bool:
    at = _utc(minute)
    return bool(trigger.get_next_fire_time(None, at) == at)


def fire_times(trigger: BaseTrigger, start: int, end: int) -> list[int]:
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
    catch_up: bool = False  # queued at start-up for the minute already under way


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
        self._last_queued: int | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self.last_fire_wall = clock.time()
        self.next_fire_wall = self._next_after(self.last_fire_wall)

    def _next_after(self, wall: float) -> float:
        at = dt.datetime.fromtimestamp(wall, tz=dt.UTC)
        nxt = self.trigger.get_next_fire_time(at, at + dt.timedelta(microseconds=1))
        return float(nxt.timestamp()) if nxt is not None else float("inf")

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

    def overdue(self, now_wall: float) -> float:
        """Seconds past the due fire plus one interval of grace (above 0: the scheduler is sick)."""
        grace = max(MINUTE_S, self.next_fire_wall - self.last_fire_wall)
        return now_wall - (self.next_fire_wall + grace)

    async def _fire(self) -> None:
        self.fire(self._clock.time() + FIRE_EARLY_S, self._clock.monotonic())

    def fire(self, wall: float, mono: float, *, catch_up: bool = False) -> None:
        """Queue the slot that `wall` falls in (the job fires at second 0 of the slot).

        A minute is queued once: a catch-up and the scheduler's own fire for the same minute,
        or a clock stepped back, never poll a minute twice. Minutes the scheduler never fired
        for (a pause, a frozen VM) are not invented here: the slot keeper finds them missed.
        """
        minute = minute_slot(wall)
        self.last_fire_wall = wall
        self.next_fire_wall = self._next_after(minute)
        if self._last_queued is not None and minute <= self._last_queued:
            log.debug("schedule.already_queued", minute=minute, catch_up=catch_up)
            return
        if self._is_open is not None and not self._is_open(minute):
            log.debug("schedule.market_closed", minute=minute)
            return
        self._last_queued = minute
        self._queue.put_nowait(Tick(minute, mono, wall, catch_up))

    async def next_tick(self) -> Tick:
        return await self._queue.get()

    def pending(self) -> int:
        return self._queue.qsize()
