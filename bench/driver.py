"""The process bench.py measures: finnstream's App, ticked by APScheduler every few seconds.

It starts the way `finnstream run` does (config, logging, `App.start`: secret, stream check, token
check), then runs `App.run_cycle` for each tick of the real `Ticker`, whose cron trigger is made
seconds-granular (`second="*/EVERY"`) so a bench needs seconds, not minutes. A cycle goes through
the scheduler, the limiter, aiohttp, the publisher and aiobotocore exactly as the daemon's do.

Each tick's due time is the whole second it was scheduled for, turned into this process's
monotonic clock (CLOCK_MONOTONIC is system-wide on Linux, so the bench can compare it with the
simulator's arrival times). Prints one JSON line `bench.cycle` per cycle beside the app's logs.
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


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def drive(config: str, every: int, ticks: int) -> None:
    cfg, _ = load_config(config)
    configure_logging(cfg.log.level, cfg.log.format)
    app = App(cfg)
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
        ticker = Ticker(cfg.schedule.cron)
        ticker.trigger = CronTrigger(second=f"*/{every}", timezone=dt.UTC)
        ticker.start()
        try:
            for _ in range(ticks):
                tick = await ticker.next_tick()
                due = math.floor(tick.fired_wall)  # the trigger fires on whole seconds
                tick_mono = tick.fired_mono - (tick.fired_wall - due)
                before, gc_before, full_before = cpu_s(), gc_timer.seconds, gc_timer.full
                await app.run_cycle(tick.minute, tick_mono)
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
