"""The spool drainer against a Kinesis that takes none, some or all of a batch."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from finnstream.clock import FakeClock
from finnstream.drain import SpoolDrainer
from finnstream.metrics import Metrics
from finnstream.records import Record
from finnstream.spool import Spool

from .test_spool import quotes, read_all


class Sink:
    """Takes the first `take` records of each batch it is sent, refuses the rest."""

    def __init__(self, take: int) -> None:
        self.take = take
        self.landed: list[Record] = []

    async def put_batch(self, records: list[Record], deadline: float | None = None) -> list[Record]:
        self.landed.extend(records[: self.take])
        return records[self.take :]


def drainer(spool: Spool, sink: Sink) -> SpoolDrainer:
    fake: Any = sink  # the drainer uses only put_batch
    return SpoolDrainer(spool, fake, FakeClock(), Metrics())


async def test_a_batch_kinesis_takes_none_of_stays_in_place_and_is_not_copied(
    tmp_path: Path,
) -> None:
    """During an outage, every failed drain used to append a copy of the batch: the copies ate
    the spool's room (it filled and shed slots sooner), and a restart sent each record twice."""
    records = quotes(1200)  # one segment, three batches
    spool = Spool(tmp_path, 1 << 20)
    spool.append(records)
    on_disk = spool.disk_bytes
    refusing = drainer(spool, Sink(take=0))
    for _ in range(5):
        assert not await refusing.drain_batch(asyncio.Event())
    assert spool.disk_bytes == on_disk
    assert read_all(Spool(tmp_path, 1 << 20)) == records  # what a restart finds: each record once

    sink = Sink(take=500)
    assert await drainer(spool, sink).drain_all(asyncio.Event())
    assert sink.landed == records  # oldest first, once each
    assert spool.depth_records == 0


async def test_what_kinesis_refused_of_a_batch_is_sent_again_and_the_rest_is_not(
    tmp_path: Path,
) -> None:
    records = quotes(20)
    spool = Spool(tmp_path, 1 << 20)
    spool.append(records)
    sink = Sink(take=15)
    partial = drainer(spool, sink)
    assert not await partial.drain_batch(asyncio.Event())
    assert read_all(spool) == records[15:]
    assert await partial.drain_batch(asyncio.Event())
    assert sink.landed == records and spool.depth_records == 0
