"""Virtual time for the deterministic simulation: an event loop whose clock moves only when
nothing is ready to run, jumping straight to the next timer.

- `VirtualClock` is shared by every "process" of one simulated run: time goes on across a
  crash and a restart, and a pause (SIGSTOP) is a jump of the clock while nothing runs.
- `VirtualLoop` is a selector event loop whose `time()` is that clock. Its selector polls the
  real file descriptors without blocking (the loop's own wake-up pipe is all there is), then
  advances the clock by the timeout the loop asked to sleep. A loop with nothing to run and
  nothing scheduled would sleep forever: that is a hang, and it raises `SimulationStuck`.
- Work sent to threads (`asyncio.to_thread`: fsync, sqlite) runs inline, so it is atomic with
  respect to the loop and takes no virtual time: a crash falls between two steps, never inside.
- APScheduler reads `datetime.now()`; `virtual_apscheduler` makes that the virtual clock, so
  the real scheduler (and its handling of missed fires after a pause) runs in the simulation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import selectors
from collections.abc import Callable, Iterator
from typing import Any


class SimulationStuck(RuntimeError):
    """Every task waits for something no timer will ever bring: a hang."""


class VirtualClock:
    """finnstream's `Clock`, on virtual time (monotonic starts at 0, wall at `epoch`)."""

    def __init__(self, epoch: float) -> None:
        self._epoch = epoch
        self.now = 0.0

    def time(self) -> float:
        return self._epoch + self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class _VirtualSelector(selectors.BaseSelector):
    def __init__(self, clock: VirtualClock) -> None:
        self._real = selectors.DefaultSelector()
        self._clock = clock

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if ready:
            return ready
        if timeout is None:
            raise SimulationStuck("nothing is ready and nothing is scheduled: a hang")
        self._clock.advance(timeout)
        return []

    def get_map(self) -> Any:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()


class _InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs the function at once, on the loop's thread: deterministic and atomic."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(_VirtualSelector(clock))
        self._vclock = clock
        self.set_default_executor(_InlineExecutor(max_workers=1))

    def time(self) -> float:
        return self._vclock.now

    def abandon(self) -> list[asyncio.Task[Any]]:
        """A crash: the loop never runs again. Its tasks are returned (keep them referenced,
        or collecting them would run their `finally` blocks, which a killed process never
        does); its file descriptors are closed, as the kernel would."""
        tasks = list(asyncio.all_tasks(self))
        for task in tasks:
            task._log_destroy_pending = False  # type: ignore[attr-defined]  # it died, not leaked
        self._close_self_pipe()  # type: ignore[attr-defined]
        self._selector.close()  # type: ignore[attr-defined]
        self._closed = True  # type: ignore[attr-defined]  # as good as closed: never run again
        return tasks


@contextlib.contextmanager
def virtual_apscheduler(clock: VirtualClock) -> Iterator[None]:
    """APScheduler's idea of now, for the duration: the virtual clock."""
    import apscheduler.schedulers.base as base  # noqa: PLC0415

    real = base.datetime

    class _Now(real):  # type: ignore[valid-type, misc]
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:
            return real.fromtimestamp(clock.time(), tz)

    base.datetime = _Now  # type: ignore[misc]
    try:
        yield
    finally:
        base.datetime = real  # type: ignore[misc]
