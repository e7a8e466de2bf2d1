"""The process bench.py measures: finnstream's App, ticked by APScheduler every few seconds.

It starts the way `finnstream run` does (config, logging, `App.start`: secret, stream check, token
check), then runs `App.run_cycle` for each tick of the real `Ticker`, whose cron trigger is made
seconds-granular (`second="*/EVERY"`) so a bench needs seconds, not minutes. A cycle goes through
the scheduler, the limiter, aiohttp, the publisher and aiobotocore exactly as the daemon's do.

Each tick's due time is the whole second it was scheduled for, turned into this process's
monotonic clock (CLOCK_MONOTONIC is system-wide on Linux, so the bench can compare it with the
simulator's arrival times). Prints one JSON line `bench.cycle` per cycle beside the app's logs.

A cycle's minute is decided by the app's wall clock (its deadlines run from the minute's second
0), so the app gets a `TickClock`: the wall clock shifted at every tick so that the tick's due
second is second 0 of a new minute slot, one minute after the previous tick's. Each tick is then
a minute of its own, as in the daemon, with its whole minute ahead of it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

from apscheduler.triggers.cron import CronTrigger

from finnstream.app import App, CycleReport
from finnstream.clock import MINUTE_S, minute_slot
from finnstream.config import load_config
from finnstream.logs import configure_logging
from finnstream.schedule import Ticker


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def hwm_kb() -> int:
    """Peak RSS of this process since its exec (ru_maxrss would count the parent's, at fork)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


class GcTimer:
    """Seconds spent in the cyclic garbage collector, and full (generation 2) collections."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._started
        self.full += info["generation"] == 2


class TickClock:
    """The real clock, its wall time shifted so each tick starts a minute slot of its own."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._minute: int | None = None

    def time(self) -> float:
        return time.time() + self._offset

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def new_minute(self, due_wall: float) -> int:
        """The minute slot for a tick due at `due_wall`: from then on, that is its second 0."""
        if self._minute is None:
            self._minute = minute_slot(due_wall) + MINUTE_S
        else:
            self._minute += MINUTE_S  # the wall clock only ever jumps forward
        self._offset = self._minute - due_wall
        return self._minute


class BenchTicker(Ticker):
    """The daemon's Ticker, queuing every fire: the bench's ticks are seconds apart and each is a
    minute of its own (`TickClock`), where the daemon's queues a minute slot only once."""

    def fire(self, wall: float, mono: float, *, catch_up: bool = False) -> None:
        self._last_queued = None
        super().fire(wall, mono, catch_up=catch_up)


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def drive(config: str, every: int, ticks: int) -> None:
    cfg, _ = load_config(config)
    configure_logging(cfg.log.level, cfg.log.format)
    clock = TickClock()
    app = App(cfg, clock=clock)
    reports: list[CycleReport] = []
    app.cycle_listeners.append(reports.append)
    gc_timer = GcTimer()
    async with app:
        tracked = len(gc.get_objects())
        emit(
            "bench.ready",
            cpu_s=cpu_s(),
            hwm_kb=hwm_kb(),
            mono=time.monotonic(),
            gc_tracked=tracked,
        )
        ticker = BenchTicker(cfg.schedule.cron)
        ticker.trigger = CronTrigger(second=f"*/{every}", timezone=dt.UTC)
        ticker.start()
        try:
            for _ in range(ticks):
                tick = await ticker.next_tick()
                due = math.floor(tick.fired_wall)  # the trigger fires on whole seconds
                tick_mono = tick.fired_mono - (tick.fired_wall - due)
                before, gc_before, full_before = cpu_s(), gc_timer.seconds, gc_timer.full
                await app.run_cycle(clock.new_minute(due))
                spent = cpu_s() - before
                report = reports[-1]
                overran = 0
                while ticker.pending():  # ticks that came due during the cycle: skipped
                    await ticker.next_tick()
                    overran += 1
                emit(
                    "bench.cycle",
                    tick_mono=tick_mono,
                    fired_late_s=tick.fired_wall - due,
                    cpu_s=spent,
                    gc_s=gc_timer.seconds - gc_before,
                    gc_full=gc_timer.full - full_before,
                    hwm_kb=hwm_kb(),
                    published=report.published,
                    delivered=report.delivered,
                    undelivered=report.undelivered,
                    spooled=report.spooled,
                    failed=report.failed,
                    took_s=report.took_s,
                    lag_s=report.lag_s,
                    overran=overran,
                )
        finally:
            ticker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--every", type=int, default=3, help="seconds between ticks (divides 60)")
    parser.add_argument("--ticks", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(drive(args.config, args.every, args.ticks))


if __name__ == "__main__":
    main()
