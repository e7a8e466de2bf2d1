"""The one rate limiter every Finnhub request goes through.

Two limits hold at once: `per_second` starts in any sliding second and `per_minute` starts in
any sliding minute. Starts are paced evenly (one every `SECOND_GUARD / per_second` seconds) rather
than in bursts, with a guard on each window so network jitter cannot make Finnhub count one more
than allowed. Each caller reserves the next free start time synchronously (first come, first
served), then sleeps until it; the clock is injected, so tests are exact and instant.

Quotes come first: a `BACKGROUND` caller (backfill) waits while any quote is waiting or in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import Iterator

from finnstream.clock import SYSTEM_CLOCK, Clock, unless
from finnstream.errors import FinnstreamError

SECOND_GUARD = 1.02  # pace as if a second were 2% longer: room for jitter on the way to Finnhub
MINUTE_GUARD_S = 0.2  # a start leaves the minute window 0.2 s after Finnhub would let it go
OVERSHOOT_S = 0.005  # a wake-up this late is timer jitter (kept on the planned pace), not a stall


def effective_rates(per_second: int, per_minute: int) -> tuple[float, int]:
    """The pace actually used: starts per second after the guard, and starts per minute."""
    return per_second / SECOND_GUARD, per_minute


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

    async def acquire(self, priority: Priority = Priority.QUOTE) -> float:
        """Wait for a start slot; returns how long the caller waited. Raises `LimiterClosed`.

        The start is recorded when the caller really goes, not when it was planned: after an
        event-loop stall, the callers behind it are spaced from the late start, never bunched.
        """
        if priority is Priority.BACKGROUND:
            while not self._quotes_idle.is_set():
                await self._quotes_idle.wait()
        asked = self._clock.monotonic()
        async with self._turn:
            if self._closed.is_set():
                raise LimiterClosed("stopping: no new requests")
            now = self._clock.monotonic()
            start = self._earliest(now)
            if start > now:
                await self._sleep_unless_closed(start - now)
            went = self._clock.monotonic()
            self._record(start if went - start <= OVERSHOOT_S else went)
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
