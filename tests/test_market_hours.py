"""`schedule.market_hours_only`: only minutes of the NYSE regular session are polled or expected."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from finnstream.ledger import GapLedger, LedgerWrite
from finnstream.simulator import Simulator

from .conftest import Aws, ConfigFactory, ShiftedClock
from .test_faults import new_app


def at(text: str) -> ShiftedClock:
    """The real clock moved to a given UTC moment (monotonic time is untouched)."""
    target = dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()
    return ShiftedClock(offset=target - time.time())


def ts(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp())


async def test_a_closed_market_is_not_polled(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    path = make_config(schedule={"market_hours_only": True})
    async with new_app(path, aws, at("2026-11-22T15:00:00")) as app:  # a Sunday
        assert await app.run_once() == 0
    assert aws.records() == []
    assert sim.stats.requests == 1  # only the start-up token check


async def test_an_early_close_day_closes_at_13_new_york(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    path = make_config(["AAPL"], schedule={"market_hours_only": True})
    async with new_app(path, aws, at("2026-11-27T17:59:10")) as app:  # 12:59 New York, Black Friday
        assert await app.run_once() == 0
    async with new_app(path, aws, at("2026-11-27T18:00:10")) as app:  # 13:00: closed early
        assert await app.run_once() == 0
    assert [r["minute"] for r in aws.records()] == [ts("2026-11-27T17:59:00")]


async def test_a_weekend_of_downtime_expects_only_session_minutes(
    make_config: ConfigFactory, aws: Aws, sim: Simulator, tmp_path: Path
) -> None:
    path = make_config(["AAPL", "MSFT"], schedule={"market_hours_only": True})
    with GapLedger(tmp_path / "spool") as ledger:  # last ran at Friday's final minute
        ledger.commit(LedgerWrite(watermark=ts("2026-11-20T20:59:00")))
    async with new_app(path, aws, at("2026-11-23T14:35:05")) as app:  # Monday 09:35 New York
        assert await app.run_once() == 0
        gaps = {(s, m) for s, m, _ in app.keeper.open_slots()}
    monday_open = ts("2026-11-23T14:30:00")
    assert gaps == {(s, monday_open + 60 * i) for s in ("AAPL", "MSFT") for i in range(5)}
    assert {r["minute"] for r in aws.records()} == {ts("2026-11-23T14:35:00")}
