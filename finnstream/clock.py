"""Time, injected. Everything that waits or stamps asks a `Clock`, so tests can run exact and fast.

`minute_slot` is the one place a minute is decided: epoch seconds floored to the minute.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Protocol, TypeVar

T = TypeVar("T")

MINUTE_S = 60


def minute_slot(epoch_s: float) -> int:
    """The minute slot (a multiple of 60) that `epoch_s` falls in."""
    return int(epoch_s // MINUTE_S) * MINUTE_S


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock epoch seconds."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` (returns at once for zero or less)."""


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock for tests: `sleep` moves time forward at once and records what was asked.

    Callers compute how long to sleep from `monotonic()` just before sleeping, so time only
    ever moves to the deadline a sleeper asked for, and reservations stay exact.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._wall0 = start
        self._now = 0.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self._wall0 + self._now

    def monotonic(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._now += max(0.0, seconds)
        await asyncio.sleep(0)


SYSTEM_CLOCK = SystemClock()


async def unless(event: asyncio.Event, aw: Awaitable[T]) -> tuple[bool, T | None]:
    """Await `aw`, unless `event` is set first, in which case `aw` is cancelled.

    Returns (True, result) when `aw` finished, (False, None) when the event won.
    """
    work = asyncio.ensure_future(aw)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not work.done():
            work.cancel()
    if work.done() and not work.cancelled():
        return True, work.result()
    return False, None
