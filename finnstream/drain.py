"""The spool drainer: a supervised background task that sends spooled records, oldest first.

It never holds a cycle open: cycles only append to the spool and wake the drainer. One batch is
in flight at a time, each with a deadline, so a throttled stream slows the drain and nothing
else. A batch is retired only after Kinesis took some of it (`Spool.ack` re-appends what was
refused before retiring the range); a batch Kinesis took none of, or cut short by a stop or a
failure, stays where it is on disk and is read again (at-least-once). After a failed batch the
drainer backs off, with jitter, up to `BACKOFF_MAX_S`; a stop ends every wait at once.
"""

from __future__ import annotations

import asyncio
import random

import structlog

from finnstream.clock import Clock, unless
from finnstream.kinesis import KinesisSink
from finnstream.metrics import Metrics
from finnstream.spool import Spool, SpoolBatch, SpoolError

log = structlog.get_logger("finnstream.drain")

BATCH_DEADLINE_S = 20.0  # one spooled batch may be retried this long
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0
IDLE_CHECK_S = 30.0  # with nothing to do, look again this often (a wake-up normally comes first)


class SpoolDrainer:
    def __init__(
        self, spool: Spool, sink: KinesisSink, clock: Clock, metrics: Metrics, *, seed: int = 0
    ) -> None:
        self._spool = spool
        self._sink = sink
        self._clock = clock
        self._metrics = metrics
        self._wake = asyncio.Event()
        self.empty = asyncio.Event()  # set whenever the drainer finds the spool empty
        self._rng = random.Random(seed)
        self.batches_sent = 0

    def wake(self) -> None:
        """Something was spooled: look now rather than at the next idle check."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Drain until `stop`, backing off while Kinesis refuses."""
        backoff = BACKOFF_MIN_S
        while not stop.is_set():
            if self._spool.depth_records == 0:
                self.empty.set()
                self._wake.clear()
                await unless(stop, self._idle())
                continue
            self.empty.clear()
            if await self.drain_batch(stop):
                backoff = BACKOFF_MIN_S
                continue
            wait = backoff * (0.5 + self._rng.random())
            await unless(stop, self._clock.sleep(wait))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _idle(self) -> None:
        await unless(self._wake, self._clock.sleep(IDLE_CHECK_S))

    async def drain_all(self, stop: asyncio.Event) -> bool:
        """Drain until the spool is empty or a batch fails; True when it is empty."""
        while self._spool.depth_records and not stop.is_set():
            if not await self.drain_batch(stop):
                break
        return self._spool.depth_records == 0

    async def drain_batch(self, stop: asyncio.Event) -> bool:
        """Send the oldest batch; True when Kinesis took all of it (or there was none)."""
        try:
            batch = await asyncio.to_thread(self._next_batch)
        except SpoolError as exc:
            self._fail("spool.read_failed", str(exc))
            return False
        if batch is None:
            return True
        deadline = self._clock.monotonic() + BATCH_DEADLINE_S
        sent, undelivered = await unless(stop, self._sink.put_batch(batch.records, deadline))
        if not sent or undelivered is None:
            return False  # stopping: the batch stays on disk, to be sent by whoever runs next
        if len(undelivered) < len(batch.records):  # Kinesis took some: retire the batch
            try:
                await asyncio.shield(asyncio.to_thread(self._spool.ack, batch, undelivered))
            except SpoolError as exc:
                self._fail("spool.ack_failed", str(exc))
                return False
            self.batches_sent += 1
        # Kinesis took none (an outage): the batch stays where it is. Re-appending it would only
        # copy it, eating the spool's room, and a restart would send the copy too.
        if undelivered:
            self._fail("spool.drain_refused", f"{len(undelivered)} records not accepted")
            return False
        log.debug("spool.drained", records=len(batch.records), left=self._spool.depth_records)
        return True

    def _next_batch(self) -> SpoolBatch | None:
        return next(iter(self._spool.batches()), None)

    def _fail(self, event: str, error: str) -> None:
        self._metrics.drain_failures.inc()
        log.warning(event, error=error, spool_records=self._spool.depth_records)
