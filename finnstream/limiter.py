"""The one rate limiter every Finnhub request goes through.

Two limits hold at once: `per_second` starts in any sliding second and `per_minute` starts in
any sliding minute. Starts are paced evenly (one every `SECOND_GUARD / per_second` seconds) rather
than in bursts, with a guard on each window so network jitter cannot make Finnhub count one more
than allowed. Each caller reserves the next free start time synchronously (first come, first
served), then sleeps until it; the clock is injected, so tests are exact and instant.

Quotes come first: a `BACKGROUND` caller (backfill) waits while any quote is waiting or in flight,
and it may never take the places in the minute window that the next cycle's quotes need
(`background_room`): with N quotes a minute, background starts in any sliding minute stay below
per_minute - N - d, where d is the fewest free places that still let N quotes start within the
cycle's window (`cycle_span`). So backfill uses what the quotes leave and never makes them drift.

What fits a minute (`cycle_span`, `capacity`): with the minute guard G, N requests every 60 s
can only settle if N <= per_minute - 1. With N = per_minute, the first start of a cycle must wait
for the previous cycle's first start + 60 + G, so every cycle starts G later than the one before,
without bound. With d = per_minute - N >= 1 free places in the window, the j-th start of a cycle
waits for the (j - d)-th start of the previous one + 60 + G, so in the steady state (every cycle
starting at its tick) every d consecutive starts span at least G, besides the per-second pace:
the last of N starts comes max((N-1)*I, q*G + r*I) after the first, with q, r = divmod(N-1, d)
and I the pacing interval. That is what the greedy limiter reaches, and `capacity` is the largest
N whose steady state starts every request within `CYCLE_START_WINDOW_S` of the tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import Iterator

from finnstream.clock import SYSTEM_CLOCK, Clock, unless
from finnstream.errors import DeadlinePassed, FinnstreamError

SECOND_GUARD = 1.02  # pace as if a second were 2% longer: room for jitter on the way to Finnhub
MINUTE_GUARD_S = 0.2  # a start leaves the minute window 0.2 s after Finnhub would let it go
OVERSHOOT_S = 0.005  # a wake-up this late is timer jitter (kept on the planned pace), not a stall
# A cycle's requests must all start within this of its tick to fit the minute: the cycle's 58 s
# retry window (cycle.RETRY_WINDOW_S) less 2 s for a late tick, a stalled loop and a few retries.
CYCLE_START_WINDOW_S = 56.0


def effective_rates(per_second: int, per_minute: int) -> tuple[float, int]:
    """The pace actually used: starts per second after the guard, and starts per minute."""
    return per_second / SECOND_GUARD, per_minute


def cycle_span(n: int, per_second: int, per_minute: int) -> float:
    """Seconds from the first to the last of `n` starts in the steady state of one cycle a minute.

    Infinite when `n` >= `per_minute`: each cycle then starts `MINUTE_GUARD_S` later than the
    one before, and never settles (see the module's docstring for the reasoning).
    """
    free = per_minute - n
    if n <= 0:
        return 0.0
    if free < 1:
        return float("inf")
    interval = SECOND_GUARD / per_second
    guarded, rest = divmod(n - 1, free)
    return max((n - 1) * interval, guarded * MINUTE_GUARD_S + rest * interval)


def background_room(
    quotes: int, per_second: int, per_minute: int, within_s: float = CYCLE_START_WINDOW_S
) -> int:
    """Background starts allowed in any sliding minute beside `quotes` quotes a minute: what
    is left once the quotes keep the free places their cycle needs to fit `within_s`."""
    for keep in range(1, per_minute - quotes + 1):
        if cycle_span(quotes, per_second, quotes + keep) <= within_s:
            return per_minute - quotes - keep
    return 0


def capacity(per_second: int, per_minute: int, within_s: float = CYCLE_START_WINDOW_S) -> int:
    """The most requests a minute whose steady-state cycle starts them all within `within_s`."""
    lo, hi = 0, min(per_minute - 1, int(within_s * per_second / SECOND_GUARD) + 1)
    while lo < hi:  # cycle_span grows with n: the largest n that fits, by bisection
        mid = (lo + hi + 1) // 2
        if cycle_span(mid, per_second, per_minute) <= within_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


class LimiterClosed(FinnstreamError):
    """The process is stopping: no new request may start."""

    retriable = False


class Priority(enum.IntEnum):
    QUOTE = 0
    BACKGROUND = 1


class RateLimiter:
    def __init__(self, per_second: int, per_minute: int, clock: Clock = SYSTEM_CLOCK) -> None:
        self._interval = SECOND_GUARD / per_second
        self._per_minute = per_minute
        self._clock = clock
        self._window: deque[float] = deque(maxlen=per_minute)  # the last `per_minute` starts
        self._background: deque[float] = deque()  # background starts still in the minute window
        self._background_room = max(0, per_minute - 1)  # until `plan_quotes` says otherwise
        self._per_second = per_second
        self._next_free = float("-inf")
        self._turn = asyncio.Lock()  # FIFO: one caller at a time waits for the next start
        self._quote_users = 0
        self._quotes_idle = asyncio.Event()
        self._quotes_idle.set()
        self._closed = asyncio.Event()

    def close(self) -> None:
        """Stop at once: every waiting and future `acquire` raises `LimiterClosed`."""
        self._closed.set()
        self._quotes_idle.set()

    @property
    def interval(self) -> float:
        return self._interval

    def plan_quotes(self, quotes: int) -> None:
        """`quotes` requests a minute are the live load: background keeps out of their way."""
        self._background_room = background_room(quotes, self._per_second, self._per_minute)

    @property
    def background_room(self) -> int:
        """Background starts allowed per sliding minute (0: the quotes need the whole key)."""
        return self._background_room

    def _background_free_at(self, now: float) -> float:
        """When a background start fits the room left by the quotes (inf if it never will)."""
        while self._background and self._background[0] + 60.0 + MINUTE_GUARD_S <= now:
            self._background.popleft()
        if self._background_room <= 0:
            return float("inf")
        if len(self._background) < self._background_room:
            return now
        return self._background[-self._background_room] + 60.0 + MINUTE_GUARD_S

    def _earliest(self, now: float) -> float:
        start = max(now, self._next_free)
        while self._window and self._window[0] + 60.0 + MINUTE_GUARD_S <= now:
            self._window.popleft()  # too old to hold anything back: memory follows traffic
        if len(self._window) == self._per_minute:
            start = max(start, self._window[0] + 60.0 + MINUTE_GUARD_S)
        return start

    def _record(self, start: float) -> None:
        self._window.append(start)
        self._next_free = start + self._interval

    def reserve(self) -> float:
        """Claim the earliest start allowed by both windows without waiting for it."""
        start = self._earliest(self._clock.monotonic())
        self._record(start)
        return start

    def delay(self) -> float:
        """Seconds until a request asked for now could start (a forecast: reserves nothing)."""
        now = self._clock.monotonic()
        return self._earliest(now) - now

    async def acquire(
        self, priority: Priority = Priority.QUOTE, *, deadline: float | None = None
    ) -> float:
        """Wait for a start slot; returns how long the caller waited. Raises `LimiterClosed`.

        The start is recorded when the caller really goes, not when it was planned: after an
        event-loop stall, the callers behind it are spaced from the late start, never bunched.
        `deadline` (monotonic): when the slot would start at or after it, raise `DeadlinePassed`
        at once, without waiting and without taking the slot (nor when a late wake-up reaches it).
        """
        background = priority is Priority.BACKGROUND
        if background:
            while not self._quotes_idle.is_set():
                await self._quotes_idle.wait()
        asked = self._clock.monotonic()
        async with self._turn:
            if self._closed.is_set():
                raise LimiterClosed("stopping: no new requests")
            now = self._clock.monotonic()
            start = self._earliest(now)
            if background:
                start = max(start, self._background_free_at(now))
            if deadline is not None and start >= deadline:
                raise DeadlinePassed(
                    f"the first free start is {start - deadline:.3f} s past the deadline"
                )
            if start > now:
                await self._sleep_unless_closed(start - now)
            went = self._clock.monotonic()
            if deadline is not None and went >= deadline:
                raise DeadlinePassed(
                    f"the wait for a start ended {went - deadline:.3f} s past the deadline"
                )
            self._record(start if went - start <= OVERSHOOT_S else went)
            if background:
                self._background.append(self._window[-1])
        return self._clock.monotonic() - asked

    async def _sleep_unless_closed(self, seconds: float) -> None:
        slept, _ = await unless(self._closed, self._clock.sleep(seconds))
        if not slept:
            raise LimiterClosed("stopping: no new requests")

    @contextlib.contextmanager
    def quotes_busy(self) -> Iterator[None]:
        """`with limiter.quotes_busy():` around a cycle holds background callers back."""
        self._quote_users += 1
        self._quotes_idle.clear()
        try:
            yield
        finally:
            self._quote_users -= 1
            if self._quote_users == 0:
                self._quotes_idle.set()
