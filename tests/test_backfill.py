"""Self-healing: gaps refilled from 1-minute candles, or published as `gap` records."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from structlog.testing import capture_logs

from finnstream.clock import minute_slot
from finnstream.ledger import GapLedger, LedgerWrite
from finnstream.simulator import Simulator, candle_for

from .conftest import Aws, ConfigFactory, current_wall, subprocess_env
from .test_faults import keys, new_app


async def cli(*args: str, aws: Aws) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "finnstream",
        *args,
        env=subprocess_env(AWS_ENDPOINT_URL=aws.url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_backfill_command_publishes_one_candle_record_per_slot(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    start = minute_slot(1_717_000_000)
    code, out, err = await cli(
        "backfill",
        "--config",
        str(make_config()),
        "--start",
        str(start),
        "--end",
        str(start + 300),
        "--symbols",
        "AAPL,MSFT,BRK.B",
        aws=aws,
    )
    assert code == 0, err
    records = aws.records()
    assert len(records) == 15
    assert set(keys(records).values()) == {1}
    for rec in records:
        bar = candle_for(rec["symbol"], rec["minute"])
        assert rec["source"] == "candle"
        assert (rec["open"], rec["high"], rec["low"], rec["price"], rec["volume"]) == (
            bar["o"],
            bar["h"],
            bar["l"],
            bar["c"],
            bar["v"],
        )
        assert rec["previous_close"] is None and rec["change"] is None
    assert {r["minute"] for r in records} == set(range(start, start + 300, 60))
    progress = [json.loads(line) for line in out.splitlines() if '"backfill.progress"' in line]
    assert [p["symbol"] for p in progress] == ["AAPL", "MSFT", "BRK.B"]


async def test_backfill_command_on_a_free_plan_exits_3_with_a_clear_message(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    sim.settings.premium = False
    code, out, err = await cli(
        "backfill",
        "--config",
        str(make_config()),
        "--start",
        "2024-06-03T14:00:00Z",
        "--end",
        "2024-06-03T14:05:00Z",
        aws=aws,
    )
    assert code == 3
    assert "403" in err and "premium" in err
    assert "Traceback" not in out + err
    assert aws.records() == []


async def test_the_daemon_refills_a_down_minute_and_an_always_failing_symbol(
    make_config: ConfigFactory, aws: Aws, sim: Simulator, tmp_path: Path
) -> None:
    sim.settings.fail_quote_symbols = frozenset({"FAIL"})
    path = make_config(["AAPL", "MSFT", "FAIL"])
    clock = current_wall()
    now = minute_slot(clock.time())
    with GapLedger(tmp_path / "spool") as ledger:  # finnstream last ran five minutes ago
        ledger.commit(LedgerWrite(watermark=now - 300))
    async with new_app(path, aws, clock) as app:
        assert await app.run_once() == 0  # FAIL's quote fails: a gap, not a loss
        expected = {(s, m) for s in ("AAPL", "MSFT", "FAIL") for m in range(now - 240, now, 60)}
        expected.add(("FAIL", now))
        assert {(s, m) for s, m, _ in app.keeper.open_slots()} == expected
    clock.offset += 180  # three minutes later the daemon is running and candles have settled
    async with new_app(path, aws, clock) as app:
        daemon = asyncio.create_task(app.run_forever())
        await asyncio.wait_for(app.backfiller.wait_passes(1), 30)  # its start-up pass
        app.request_stop()
        assert await asyncio.wait_for(daemon, 30) == 0
    candles = {(r["symbol"], r["minute"]): r for r in aws.records() if r["source"] == "candle"}
    assert expected <= set(candles)
    for symbol, minute in expected:
        assert candles[(symbol, minute)]["price"] == candle_for(symbol, minute)["c"]


async def test_a_free_plan_turns_backfill_off_once_and_publishes_gap_records(
    make_config: ConfigFactory, aws: Aws, sim: Simulator, tmp_path: Path
) -> None:
    sim.settings.premium = False
    clock = current_wall()
    now = minute_slot(clock.time())
    with GapLedger(tmp_path / "spool") as ledger:
        ledger.add([("AAPL", now - 600), ("MSFT", now - 600)], "finnstream was not running")
    async with new_app(make_config(["AAPL", "MSFT"]), aws, clock) as app:
        with capture_logs() as logs:
            await app.backfiller.run_once()
            app.ledger.add([("AAPL", now - 540)], "quote failed")
            await app.backfiller.run_once()
        assert app.ledger.count() == 0
        assert not app.backfiller.enabled
    assert [e["event"] for e in logs].count("backfill.disabled") == 1
    gaps = [r for r in aws.records() if r["source"] == "gap"]
    assert sorted((g["symbol"], g["minute"]) for g in gaps) == [
        ("AAPL", now - 600),
        ("AAPL", now - 540),
        ("MSFT", now - 600),
    ]
    assert all("403" in g["reason"] and g["price"] is None for g in gaps)
    assert sim.stats.candle_requests == 1  # it noticed once and stopped asking


async def test_a_slot_without_candles_becomes_a_gap_record_after_max_attempts(
    make_config: ConfigFactory, aws: Aws, sim: Simulator, tmp_path: Path
) -> None:
    sim.settings.no_candle_symbols = frozenset({"THIN"})
    clock = current_wall()
    slot = minute_slot(clock.time()) - 600
    with GapLedger(tmp_path / "spool") as ledger:
        ledger.add([("THIN", slot), ("AAPL", slot)], "quote failed")
    async with new_app(
        make_config(["AAPL", "THIN"], backfill={"max_attempts": 2}), aws, clock
    ) as app:
        await app.backfiller.run_once()
        assert [(g.symbol, g.attempts) for g in app.ledger.open_gaps()] == [("THIN", 1)]
        await app.backfiller.run_once()
        assert app.ledger.count() == 0
    by_source = {(r["symbol"], r["source"]) for r in aws.records()}
    assert by_source == {("AAPL", "candle"), ("THIN", "gap")}


async def test_backfill_turned_off_publishes_gap_records_and_says_why(
    make_config: ConfigFactory, aws: Aws, sim: Simulator, tmp_path: Path
) -> None:
    clock = current_wall()
    slot = minute_slot(clock.time()) - 600
    with GapLedger(tmp_path / "spool") as ledger:
        ledger.add([("AAPL", slot)], "quote failed")
    path = make_config(["AAPL"], backfill={"enabled": False})
    async with new_app(path, aws, clock) as app:
        cycled = asyncio.Event()
        app.cycle_listeners.append(lambda _: cycled.set())
        daemon = asyncio.create_task(app.run_forever())
        await asyncio.wait_for(app.backfiller.wait_passes(1), 30)
        await asyncio.wait_for(cycled.wait(), 30)  # the catch-up cycle, so it leaves no gap
        app.request_stop()
        assert await asyncio.wait_for(daemon, 10) == 0
        assert app.ledger.count() == 0
        assert app.health.check(app.clock.monotonic())[1]["backfill_enabled"] is False
    (gap,) = [r for r in aws.records() if r["source"] == "gap"]
    assert gap["minute"] == slot and "backfill.enabled: false" in gap["reason"]
    assert sim.stats.candle_requests == 0
