"""Never lose a minute: Kinesis faults, outages, stops and crashes, with real servers."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections import Counter
from pathlib import Path

from finnstream.app import App
from finnstream.config import load_config
from finnstream.records import gap_record
from finnstream.simulator import Simulator, quote_for

from .conftest import (
    Aws,
    ConfigFactory,
    ShiftedClock,
    app_env,
    current_wall,
    early_in_a_minute,
    open_slots,
    quotes_served,
    subprocess_env,
)
from .faults import KinesisFaults, RefusingProxy, patched_kinesis


def new_app(path: Path, aws: Aws, clock: ShiftedClock | None = None, **env: str) -> App:
    environ = {**app_env(aws), **env}
    cfg, _ = load_config(path, environ=environ)
    return App(cfg, environ=environ, clock=clock or current_wall())


def keys(records: list[dict]) -> Counter[tuple[str, int, str]]:  # type: ignore[type-arg]
    return Counter((r["symbol"], r["minute"], r["source"]) for r in records)


async def test_throttled_records_and_failing_calls_land_exactly_once(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    symbols = [f"S{i:04d}" for i in range(600)]
    path = make_config(symbols, kinesis={"max_retries": 12})
    faults = KinesisFaults(record_throttle=0.3, call_failure=0.1)
    with patched_kinesis(faults):
        async with new_app(path, aws) as app:
            code = await app.run_once()
    assert code == 0
    landed = keys(aws.records())
    assert len(landed) == 600 and set(landed.values()) == {1}
    assert max(faults.calls) <= 500
    assert len(faults.calls) > 2  # the failures really were retried
    assert app.spool.depth_records == 0


async def test_outage_spools_and_exits_1_then_next_run_delivers_without_doubles(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    path = make_config(["AAPL", "MSFT", "BRK.B"])
    clock = current_wall()
    with patched_kinesis(KinesisFaults(outage=True)):
        async with new_app(path, aws, clock) as app:
            assert await app.run_once() == 1
            assert app.spool.depth_records == 3
    assert aws.records() == []
    clock.offset += 60  # the next run is a minute later
    async with new_app(path, aws, clock) as app:
        assert await app.run_once() == 0
        assert app.spool.depth_records == 0
    landed = keys(aws.records())
    assert len(landed) == 6 and set(landed.values()) == {1}
    assert len({minute for _, minute, _ in landed}) == 2


async def test_refused_connections_spool_then_recover(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    host, port = aws.url.removeprefix("http://").split(":")
    clock = current_wall()
    async with RefusingProxy(host, int(port)) as proxy:
        path = make_config(["AAPL", "MSFT"], kinesis={"endpoint_url": proxy.url})
        async with new_app(path, aws, clock) as app:
            proxy.refuse()
            assert await app.run_once() == 1
            assert app.spool.depth_records == 2
            assert proxy.refused > 0
            proxy.refuse(False)
            clock.offset += 60
            assert await app.run_once() == 0
    landed = keys(aws.records())
    assert len(landed) == 4 and set(landed.values()) == {1}


async def test_sigterm_mid_cycle_stops_fetching_and_loses_no_answered_quote(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    symbols = [f"P{i:03d}" for i in range(40)]
    path = make_config(symbols, finnhub={"requests_per_second": 5, "requests_per_minute": 6000})
    async with new_app(path, aws) as app:
        sim.reset_stats()
        task = asyncio.create_task(app.run_once())
        await asyncio.wait_for(sim.wait_served(12), 10)  # about three seconds into the cycle
        app.request_stop()
        code = await asyncio.wait_for(task, 10)
        gaps = {(g.symbol, g.minute) for g in app.ledger.open_gaps()}
    served = {(s, m) for s, m, _ in quotes_served(sim)}
    assert code == 1  # the cycle did not finish
    assert len(served) < 20  # it stopped asking at once
    landed = {(s, m) for s, m, _ in keys(aws.records())}
    assert landed == served  # every answered quote was delivered
    (minute,) = {m for _, m in served}
    assert gaps == {(s, minute) for s in symbols} - served  # the rest are gaps, to be refilled
    # Whoever runs next in the same minute (a deploy's standby) polls the minute again and
    # takes the slots it fills out of the ledger: live quotes, not candles later.
    fast = make_config(symbols)
    async with new_app(fast, aws) as successor:
        assert await successor.run_once() == 0
        assert successor.ledger.count() == 0
    assert {(s, m) for s, m, _ in keys(aws.records())} == {(s, minute) for s in symbols}


async def test_sigkill_loses_at_most_the_cycle_and_its_slots_become_gaps(
    make_config: ConfigFactory, aws: Aws, sim: Simulator, tmp_path: Path, wall: ShiftedClock
) -> None:
    wall.offset = 0.0  # a real process on the real clock: so is the simulator
    await early_in_a_minute()
    symbols = [f"K{i:02d}" for i in range(20)]
    path = make_config(symbols, finnhub={"requests_per_second": 3, "requests_per_minute": 6000})
    env = subprocess_env(AWS_ENDPOINT_URL=aws.url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "finnstream",
        "run",
        "--once",
        "--config",
        str(path),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.wait_for(sim.wait_served(4), 30)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    (killed_minute,) = {m for _, m, _ in quotes_served(sim)}
    # The next start finds the interrupted cycle's slots and re-polls or ledgers every one.
    fast = make_config(symbols)
    restart = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "finnstream",
        "run",
        "--once",
        "--config",
        str(fast),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(restart.wait(), 60) == 0
    gaps = open_slots(tmp_path / "spool")
    landed = {(s, m) for s, m, src in keys(aws.records()) if src == "quote"}
    for symbol in symbols:
        assert (symbol, killed_minute) in landed | gaps


async def test_a_hanging_and_a_failing_symbol_do_not_hold_up_the_others(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    sim.settings.hang_symbols = frozenset({"HANG"})
    sim.settings.fail_symbols = frozenset({"FAIL"})
    path = make_config(["AAPL", "HANG", "FAIL", "MSFT"], finnhub={"timeout_s": 0.3, "retries": 1})
    async with new_app(path, aws) as app:
        code = await app.run_once()
        gaps = {g.symbol: g.reason for g in app.ledger.open_gaps()}
    assert code == 0  # everything fetched was delivered; the failures are gaps, not losses
    assert sorted(r["symbol"] for r in aws.records()) == ["AAPL", "MSFT"]
    assert set(gaps) == {"HANG", "FAIL"}
    assert "timed out" in gaps["HANG"] and "HTTP 500" in gaps["FAIL"]


async def test_flaky_finnhub_loses_nothing(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    sim.settings.error_rate = 0.2
    symbols = [f"F{i:03d}" for i in range(200)]
    async with new_app(make_config(symbols, finnhub={"retries": 8}), aws) as app:
        code = await app.run_once()
    assert code == 0
    records = aws.records()
    assert sorted(r["symbol"] for r in records) == symbols
    minute = records[0]["minute"]
    assert all(r["price"] == quote_for(r["symbol"], minute)["c"] for r in records)
    assert sim.stats.by_status[500] + sim.stats.by_status[502] > 10  # the faults were real


async def test_paced_run_never_sees_a_429(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    sim.settings.requests_per_second = 10
    sim.settings.requests_per_minute = 100
    symbols = [f"R{i:02d}" for i in range(35)]
    path = make_config(symbols, finnhub={"requests_per_second": 10, "requests_per_minute": 100})
    async with new_app(path, aws) as app:
        code = await app.run_once()
    assert code == 0
    assert sim.stats.rate_limited == 0
    assert len(aws.records()) == 35


async def test_a_backlog_drains_oldest_first_in_the_background_and_never_holds_the_minute(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    async with new_app(make_config(["AAPL", "MSFT"]), aws) as app:
        backlog = [gap_record(f"B{i:05d}", 60 * (i // 1000), "outage", 0.0) for i in range(12_000)]
        assert app.keeper.spool_records(backlog) == []
        left_at_report: list[int] = []
        app.cycle_listeners.append(lambda _: left_at_report.append(app.spool.depth_records))
        daemon = asyncio.create_task(app.run_forever())
        await asyncio.wait_for(app.drainer.empty.wait(), 60)
        app.request_stop()
        assert await asyncio.wait_for(daemon, 10) == 0
    landed = aws.records()
    current = [r for r in landed if r["source"] == "quote"]
    drained = [r["symbol"] for r in landed if r["source"] == "gap"]
    assert sorted(r["symbol"] for r in current) == ["AAPL", "MSFT"]  # not starved
    assert left_at_report[0] > 0  # the cycle settled while the backlog was still going out
    assert drained == [f"B{i:05d}" for i in range(12_000)]  # all of it, oldest first
