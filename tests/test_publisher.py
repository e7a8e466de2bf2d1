"""The Publisher under a deadline: a cancelled close stops waiting for sends that hang."""

from __future__ import annotations

import asyncio
from typing import Any

from finnstream.clock import FakeClock
from finnstream.kinesis import Publisher
from finnstream.records import Record, quote_record


class HangingSink:
    """A Kinesis sink whose PutRecords never answers (a call hanging until its read timeout)."""

    async def put_batch(self, records: list[Record], deadline: float | None = None) -> Any:
        await asyncio.Event().wait()


async def test_a_cancelled_close_does_not_wait_for_hanging_sends_and_abort_spools_them() -> None:
    """The cycle cancels `close()` at its publish deadline; `close()` used to swallow that
    cancel (in `suppress(CancelledError)` around its linger task) and wait on, holding the minute
    and the next ticks, as long as Kinesis hung."""
    sink = HangingSink()
    publisher = Publisher(sink, FakeClock(), linger_s=0.01)  # type: ignore[arg-type]
    records = [quote_record(f"S{i}", 60, {"c": 1.0, "t": 1}, 61.0) for i in range(3)]
    for record in records:
        publisher.add(record)
    await asyncio.sleep(0)  # the linger task and the sends are under way

    closing = asyncio.ensure_future(publisher.close())
    await asyncio.sleep(0)
    closing.cancel()
    done, _ = await asyncio.wait({closing}, timeout=1.0)

    assert closing in done and closing.cancelled()
    assert sorted(r.symbol for r in await publisher.abort()) == ["S0", "S1", "S2"]
