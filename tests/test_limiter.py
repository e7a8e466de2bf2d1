"""The rate limiter, on an injected FakeClock: exact start times, both windows, close, priority."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finnstream.clock import FakeClock
from finnstream.config import FinnhubConfig, minute_capacity
from finnstream.errors import DeadlinePassed
from finnstream.limiter import (
    CYCLE_START_WINDOW_S,
    MINUTE_GUARD_S,
    SECOND_GUARD,
    LimiterClosed,
    Priority,
    RateLimiter,
    capacity,
    cycle_span,
)

EPS = 1e-9


def max_in_window(starts: list[float], width: float) -> int:
    """The most starts any half-open window (t - width, t] holds (t ranging over the starts)."""
    ordered = sorted(starts)
    best = 0
    for i, t in enumerate(ordered):
        first = bisect.bisect_right(ordered, t - width + EPS)
        best = max(best, i + 1 - first)
    return best


async def acquire_starts(limiter: RateLimiter, clock: FakeClock, n: int) -> list[float]:
    """Acquire `n` times in sequence; the FakeClock's time after each is that request's start."""
    starts = []
    for _ in range(n):
        await limiter.acquire()
        starts.append(clock.monotonic())
    return starts


class StuckClock(FakeClock):
    """A FakeClock whose sleep never returns: a waiter stays waiting until something else acts."""

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.Event().wait()


# --- reserve: exact start times --------------------------------------------------------------


def test_reserve_paces_starts_evenly_from_now() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_second=10, per_minute=1000, clock=clock)
    interval = SECOND_GUARD / 10

    starts = [limiter.reserve() for _ in range(5)]

    assert limiter.interval == pytest.approx(interval)
    assert starts == pytest.approx([0.0, interval, 2 * interval, 3 * interval, 4 * interval])


def test_reserve_waits_for_the_minute_window_plus_its_guard() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_second=30, per_minute=3, clock=clock)

    starts = [limiter.reserve() for _ in range(5)]

    interval = SECOND_GUARD / 30
    assert starts == pytest.approx(
        [0.0, interval, 2 * interval, 60 + MINUTE_GUARD_S, 60 + MINUTE_GUARD_S + interval]
    )


def test_delay_forecasts_without_reserving() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_second=1, per_minute=60, clock=clock)

    assert limiter.delay() == 0
    limiter.reserve()
    assert limiter.delay() == pytest.approx(SECOND_GUARD)
    assert limiter.delay() == pytest.approx(SECOND_GUARD)
    assert limiter.reserve() == pytest.approx(SECOND_GUARD)


# --- acquire: the windows hold ---------------------------------------------------------------


async def test_free_plan_sixty_go_in_two_seconds_and_the_61st_waits_a_minute() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_second=30, per_minute=60, clock=clock)

    starts = await acquire_starts(limiter, clock, 61)

    assert starts[0] == 0.0
    assert starts[59] == pytest.approx(59 * SECOND_GUARD / 30)
    assert starts[59] < 2.1
    assert starts[60] == pytest.approx(starts[0] + 60 + MINUTE_GUARD_S)
    assert max_in_window(starts, 1.0) <= 30
    assert max_in_window(starts, 60.0) <= 60


async def test_acquire_returns_how_long_it_waited() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_second=2, per_minute=60, clock=clock)

    assert await limiter.acquire() == 0.0
    assert await limiter.acquire() == pytest.approx(SECOND_GUARD / 2)
    assert clock.sleeps == pytest.approx([SECOND_GUARD / 2])


async def test_many_starts_never_break_either_window_and_are_evenly_spaced() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_second=5, per_minute=120, clock=clock)

    starts = await acquire_starts(limiter, clock, 400)

    assert max_in_window(starts, 1.0) <= 5
    assert max_in_window(starts, 60.0) <= 120
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) == pytest.approx(SECOND_GUARD / 5)
    # inside each minute window the pace is exactly the interval
    assert gaps[:119] == pytest.approx([SECOND_GUARD / 5] * 119)


async def test_concurrent_callers_are_served_in_order_and_spaced() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_second=10, per_minute=15, clock=clock)
    order: list[int] = []
    starts: list[float] = []

    async def caller(i: int) -> None:
        await limiter.acquire()
        order.append(i)
        starts.append(clock.monotonic())

    await asyncio.gather(*(caller(i) for i in range(20)))

    assert order == list(range(20))
    assert starts == sorted(starts)
    assert max_in_window(starts, 1.0) <= 10
    assert max_in_window(starts, 60.0) <= 15
    assert starts[:15] == pytest.approx([i * SECOND_GUARD / 10 for i in range(15)])
    assert starts[15] == pytest.approx(60 + MINUTE_GUARD_S)


async def test_after_idle_the_first_request_goes_at_once_without_a_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_second=2, per_minute=60, clock=clock)
    await acquire_starts(limiter, clock, 3)
    clock.advance(300.0)
    idle_until = clock.monotonic()

    waited = await limiter.acquire()
    second = await limiter.acquire()

    assert waited == 0.0
    assert clock.monotonic() == pytest.approx(idle_until + SECOND_GUARD / 2)
    assert second == pytest.approx(SECOND_GUARD / 2)  # no catch-up burst for the idle time


# --- close -----------------------------------------------------------------------------------


async def test_close_wakes_a_waiting_acquire_at_once() -> None:
    clock = StuckClock()
    limiter = RateLimiter(per_second=1, per_minute=1, clock=clock)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not waiter.done()
    assert clock.sleeps == pytest.approx([60 + MINUTE_GUARD_S])

    limiter.close()

    with pytest.raises(LimiterClosed):
        await asyncio.wait_for(waiter, timeout=1.0)


async def test_close_wakes_every_queued_caller() -> None:
    limiter = RateLimiter(per_second=1, per_minute=1, clock=StuckClock())
    await limiter.acquire()
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(3)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)

    limiter.close()

    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), timeout=1.0)
    assert all(isinstance(r, LimiterClosed) for r in results), results


async def test_acquire_after_close_raises_at_once() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_second=30, per_minute=60, clock=clock)
    limiter.close()

    with pytest.raises(LimiterClosed):
        await limiter.acquire()
    with pytest.raises(LimiterClosed):
        await limiter.acquire(Priority.BACKGROUND)
    assert clock.sleeps == []
    assert LimiterClosed("x").retriable is False


# --- priority --------------------------------------------------------------------------------


async def test_background_waits_while_quotes_are_busy_then_proceeds() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_second=30, per_minute=600, clock=clock)

    with limiter.quotes_busy():
        background = asyncio.create_task(limiter.acquire(Priority.BACKGROUND))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not background.done()
        await limiter.acquire(Priority.QUOTE)  # quotes go through meanwhile
        await asyncio.sleep(0)
        assert not background.done()

    await asyncio.wait_for(background, timeout=1.0)


async def test_background_waits_for_every_nested_quote_user() -> None:
    limiter = RateLimiter(per_second=30, per_minute=600, clock=FakeClock())

    with limiter.quotes_busy():
        with limiter.quotes_busy():
            background = asyncio.create_task(limiter.acquire(Priority.BACKGROUND))
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not background.done()

    await asyncio.wait_for(background, timeout=1.0)


async def test_background_without_quotes_goes_at_once() -> None:
    limiter = RateLimiter(per_second=30, per_minute=600, clock=FakeClock())

    assert await limiter.acquire(Priority.BACKGROUND) == 0.0


async def test_close_releases_a_background_waiter_with_limiter_closed() -> None:
    limiter = RateLimiter(per_second=30, per_minute=600, clock=FakeClock())

    with limiter.quotes_busy():
        background = asyncio.create_task(limiter.acquire(Priority.BACKGROUND))
        await asyncio.sleep(0)
        limiter.close()
        with pytest.raises(LimiterClosed):
            await asyncio.wait_for(background, timeout=1.0)


# --- property --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, database=None)
@given(
    per_second=st.integers(min_value=1, max_value=30),
    per_minute=st.integers(min_value=1, max_value=120),
    n=st.integers(min_value=1, max_value=250),
    idle=st.lists(st.floats(min_value=0, max_value=90), max_size=3),
)
def test_windows_always_hold(per_second: int, per_minute: int, n: int, idle: list[float]) -> None:
    pauses = {i * n // (len(idle) + 1): pause for i, pause in enumerate(idle, start=1)}

    async def run() -> list[float]:
        clock = FakeClock()
        limiter = RateLimiter(per_second=per_second, per_minute=per_minute, clock=clock)
        starts: list[float] = []
        for i in range(n):
            clock.advance(pauses.get(i, 0.0))
            await limiter.acquire()
            starts.append(clock.monotonic())
        return starts

    starts = asyncio.run(run())

    assert starts == sorted(starts)
    assert max_in_window(starts, 1.0) <= per_second
    assert max_in_window(starts, 60.0) <= per_minute
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= SECOND_GUARD / per_second - EPS for gap in gaps)


# --- what fits a minute: cycles at capacity never drift --------------------------------------

FIVE_HOURS_OF_CYCLES = 300


async def cycle_starts(
    n: int, per_second: int, per_minute: int, cycles: int, *, waiting: bool = True
) -> list[list[float]]:
    """`cycles` cycles of `n` requests, one every 60 s: each start, in seconds after its tick.

    A cycle begins at its tick, or when the previous one's last start is later than the tick.
    `waiting`: each request `acquire`s (and the FakeClock sleeps); else it `reserve`s its start
    and the clock moves there (the same windows, ten times faster for long runs).
    """
    clock = FakeClock()
    limiter = RateLimiter(per_second=per_second, per_minute=per_minute, clock=clock)
    out = []
    for k in range(cycles):
        tick = 60.0 * k
        clock.advance(max(0.0, tick - clock.monotonic()))
        if waiting:
            starts = await acquire_starts(limiter, clock, n)
        else:
            starts = []
            for _ in range(n):
                starts.append(limiter.reserve())
                clock.advance(starts[-1] - clock.monotonic())
        out.append([start - tick for start in starts])
    return out


@pytest.mark.parametrize(
    ("per_second", "per_minute", "fits"),
    [(30, 60, 59), (30, 300, 298)],
    ids=["free-plan", "300-a-minute"],
)
async def test_five_hours_of_cycles_at_capacity_start_at_the_tick_and_within_the_minute(
    per_second: int, per_minute: int, fits: int
) -> None:
    plan = FinnhubConfig(requests_per_second=per_second, requests_per_minute=per_minute)
    assert minute_capacity(plan) == fits  # what check-config says fits

    waiting = fits < 100  # the long run reserves its starts instead: the same windows, faster
    cycles = await cycle_starts(fits, per_second, per_minute, FIVE_HOURS_OF_CYCLES, waiting=waiting)

    assert all(starts[0] == pytest.approx(0.0, abs=1e-6) for starts in cycles)  # at the tick
    assert max(max(starts) for starts in cycles) <= CYCLE_START_WINDOW_S
    assert max(cycles[-1]) == pytest.approx(cycle_span(fits, per_second, per_minute))


async def test_one_more_than_the_free_plans_capacity_drifts_a_guard_a_cycle() -> None:
    cycles = await cycle_starts(60, 30, 60, FIVE_HOURS_OF_CYCLES)

    firsts = [starts[0] for starts in cycles]
    assert firsts == pytest.approx([k * MINUTE_GUARD_S for k in range(FIVE_HOURS_OF_CYCLES)])
    assert firsts[-1] > CYCLE_START_WINDOW_S  # five hours in, the quotes start a minute late
    assert cycle_span(60, 30, 60) == math.inf


async def test_one_more_than_capacity_at_300_a_minute_starts_past_the_window() -> None:
    cycles = await cycle_starts(299, 30, 300, FIVE_HOURS_OF_CYCLES, waiting=False)

    assert all(starts[0] == pytest.approx(0.0, abs=1e-6) for starts in cycles)
    # each cycle spreads 0.2 s wider than the one before, until its last requests start after
    # the minute's 58 s retry window (a steady span of 59.6 s)
    assert max(cycles[-1]) == pytest.approx(cycle_span(299, 30, 300))
    assert max(cycles[-1]) > 58.0


async def test_at_the_per_second_pace_capacity_fills_the_window_and_no_more() -> None:
    fits = capacity(30, 6000)

    cycles = await cycle_starts(fits, 30, 6000, 3)
    over = await cycle_starts(fits + 1, 30, 6000, 1)

    assert fits == 1648
    assert all(starts[0] == 0.0 for starts in cycles)
    assert max(cycles[-1]) <= CYCLE_START_WINDOW_S < max(over[-1])


@pytest.mark.parametrize(
    ("per_second", "per_minute", "fits"),
    [(30, 60, 59), (30, 300, 298), (30, 600, 597), (30, 6000, 1648), (1, 60, 55), (5, 3, 2)],
)
def test_capacity_figures(per_second: int, per_minute: int, fits: int) -> None:
    assert capacity(per_second, per_minute) == fits
    assert cycle_span(fits, per_second, per_minute) <= CYCLE_START_WINDOW_S
    assert cycle_span(fits + 1, per_second, per_minute) > CYCLE_START_WINDOW_S


def test_nothing_fits_one_request_a_minute() -> None:
    assert capacity(30, 1) == 0  # one symbol would start 0.2 s later every minute


# --- deadlines: no start at or after it ------------------------------------------------------


async def test_a_start_at_or_after_the_deadline_is_refused_at_once_and_not_taken() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_second=10, per_minute=2, clock=clock)
    await acquire_starts(limiter, clock, 2)  # the window is full until 60.2

    with pytest.raises(DeadlinePassed, match="past the deadline"):
        await limiter.acquire(deadline=58.0)
    with pytest.raises(DeadlinePassed):
        await limiter.acquire(deadline=60 + MINUTE_GUARD_S)  # "at" counts as after

    assert clock.monotonic() == pytest.approx(SECOND_GUARD / 10)  # nobody waited
    await limiter.acquire(deadline=61.0)  # the slot refused twice is still free
    assert clock.monotonic() == pytest.approx(60 + MINUTE_GUARD_S)


class LateClock(FakeClock):
    """A FakeClock whose sleeps overshoot by `late` seconds (a stalled event loop)."""

    def __init__(self, late: float) -> None:
        super().__init__()
        self.late = late

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds + self.late)


async def test_a_wake_up_past_the_deadline_does_not_start_either() -> None:
    clock = LateClock(late=1.0)
    limiter = RateLimiter(per_second=1, per_minute=100, clock=clock)
    await limiter.acquire()

    with pytest.raises(DeadlinePassed, match="wait for a start ended"):
        await limiter.acquire(deadline=1.5)  # planned at 1.02, woken at 2.02

    clock.late = 0.0
    await limiter.acquire()
    assert clock.monotonic() == pytest.approx(2.02)  # the refused start was not recorded
