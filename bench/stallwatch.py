"""`finnstream` with a watchdog on its event loop: where the loop was when it stalled.

    python bench/stallwatch.py run --config PATH      # any finnstream command line

A coroutine stamps a heartbeat every 2 ms; a thread checks it every 5 ms and, whenever the loop
has not turned for `BENCH_STALL_MS` (default 50), writes the loop thread's stack to stderr once
per stall, as `stall.stack` blocks (`bench.py --downtime --stalls MS` collects them). The lag
gauge says how long the loop stalled; this says where. For finding, not for figures: the
heartbeat costs a little CPU, and code that holds the GIL delays the thread's look as well
(the stall it reports is then longer than the threshold).
"""

from __future__ import annotations

import asyncio
import asyncio.events
import os
import sys
import threading
import time
import traceback

from finnstream.cli import main

BEAT_S = 0.002
LOOK_S = 0.005
FRAMES = 16


class Watch:
    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self.beat = time.monotonic()
        self.loop_thread = threading.get_ident()

    async def heartbeat(self) -> None:
        while True:
            self.beat = time.monotonic()
            await asyncio.sleep(BEAT_S)

    def watch(self) -> None:
        reported = 0.0
        while True:
            time.sleep(LOOK_S)
            beat = self.beat
            stalled = time.monotonic() - beat
            if stalled < self.threshold_s or beat == reported:
                continue
            reported = beat
            frame = sys._current_frames().get(self.loop_thread)
            stack = "".join(traceback.format_stack(frame)[-FRAMES:]) if frame else "?\n"
            sys.stderr.write(f"stall.stack {stalled * 1000:.0f} ms at {time.time():.3f}\n{stack}")
            sys.stderr.write("stall.end\n")


def watched_loop() -> asyncio.AbstractEventLoop:
    loop = new_event_loop()
    watch = Watch(float(os.environ.get("BENCH_STALL_MS", "50")) / 1000)
    loop.call_soon(lambda: loop.create_task(watch.heartbeat()))
    threading.Thread(target=watch.watch, daemon=True).start()
    return loop


new_event_loop = asyncio.events.new_event_loop
asyncio.events.new_event_loop = watched_loop  # asyncio.run's Runner asks this for its loop

if __name__ == "__main__":
    sys.exit(main())
