"""The slot keeper: where each slot goes when Kinesis, the spool or the disk says no.

Real spool and ledger files in a temporary directory; disk failures are injected by making the
spool's fsync or the ledger's commit raise as a full disk does.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from structlog.testing import capture_logs

import finnstream.spool
from finnstream.ledger import GapLedger, LedgerError, LedgerWrite
from finnstream.records import Record, gap_record, quote_record
from finnstream.schedule import MAX_LOOKBACK_S
from finnstream.slots import (
    DISK_REFUSED,
    MAX_HELD_SETTLEMENTS,
    NO_CYCLE,
    NOT_RUNNING,
    SPOOL_FULL,
    STOPPED_REASON,
    Expected,
    Settlement,
    SlotKeeper,
)
from finnstream.spool import Spool

M = 1_772_460_000  # a minute slot (Monday 2 March 2026, 14:00 UTC)
SYMBOLS = ["AAPL", "MSFT", "AMZN"]


def quote(symbol: str, minute: int) -> Record:
    return quote_record(symbol, minute, {"c": 100.0, "t": 1}, minute + 0.5)


def make_keeper(
    directory: Path, max_bytes: int = 1 << 20, symbols: list[str] = SYMBOLS
) -> SlotKeeper:
    return SlotKeeper(
        Spool(directory, max_bytes), GapLedger(directory), symbols, Expected("* * * * *")
    )


@pytest.fixture
def keeper(tmp_path: Path) -> Iterator[SlotKeeper]:
    k = make_keeper(tmp_path)
    k.account_downtime(M)
    yield k
    k.ledger.close()


def where(keeper: SlotKeeper, symbol: str, minute: int) -> str:
    """Where a slot is durable: 'spool', 'ledger', or 'nowhere'."""
    spooled = {(r.symbol, r.minute) for b in keeper.spool.batches() for r in b.records}
    ledgered = {(s, m) for s, m, _ in keeper.open_slots()}
    if (symbol, minute) in spooled:
        return "spool"
    return "ledger" if (symbol, minute) in ledgered else "nowhere"


class FullDisk:
    """Make the spool's fsync, the ledger's commits, or both, fail as a full disk does."""

    def __init__(self) -> None:
        self.spool = False
        self.ledger = False

    def fsync(self, fd: int) -> None:
        if self.spool:
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@pytest.fixture
def disk() -> Iterator[FullDisk]:
    full = FullDisk()
    real_commit = GapLedger.commit

    def commit(self: GapLedger, write: LedgerWrite) -> int:
        if full.ledger:
            raise LedgerError("The gap ledger cannot be written (database or disk is full).")
        return real_commit(self, write)

    with (
        mock.patch.object(finnstream.spool, "os", full),
        mock.patch.object(GapLedger, "commit", commit),
    ):
        yield full


def test_a_settled_minute_is_spooled_ledgered_and_past_the_watermark(keeper: SlotKeeper) -> None:
    settled = keeper.settle(Settlement(M, [quote("AAPL", M)], {"MSFT": "quote failed: HTTP 500"}))

    assert settled and keeper.watermark == M
    assert where(keeper, "AAPL", M) == "spool"
    assert where(keeper, "MSFT", M) == "ledger"
    assert keeper.ledger.watermark() == M  # durable, not only in memory


def test_two_thousand_failed_quotes_are_one_transaction(tmp_path: Path) -> None:
    symbols = [f"S{i:04d}" for i in range(2_000)]
    keeper = make_keeper(tmp_path, symbols=symbols)
    keeper.account_downtime(M)
    with mock.patch.object(GapLedger, "commit", autospec=True, side_effect=GapLedger.commit) as spy:
        keeper.settle(Settlement(M, failed=dict.fromkeys(symbols, "quote failed")))

    assert spy.call_count == 1
    assert keeper.ledger.count() == 2_000


def test_what_a_full_spool_refuses_stays_in_the_ledger(tmp_path: Path) -> None:
    """Issue 8.1: the refused records' slots were ledgered and then resolved: in neither."""
    keeper = make_keeper(tmp_path, max_bytes=2_000)
    keeper.account_downtime(M)
    records = [quote(f"S{i:02d}", M) for i in range(12)]  # about 3 KB of spool lines

    settlement = Settlement(M, records)
    keeper.settle(settlement)

    places = {r.symbol: where(keeper, r.symbol, M) for r in records}
    assert "nowhere" not in places.values()
    assert {"spool", "ledger"} == set(places.values())
    assert settlement.written == list(places.values()).count("spool")  # what cycle.done reports
    reasons = {s: r for s, _, r in keeper.open_slots()}
    assert all(reasons[s] == SPOOL_FULL for s, p in places.items() if p == "ledger")


def test_a_spool_write_error_sheds_to_the_ledger(keeper: SlotKeeper, disk: FullDisk) -> None:
    """Issue 8.5: a SpoolError escaped the cycle and the daemon died."""
    disk.spool = True

    assert keeper.settle(Settlement(M, [quote("AAPL", M)]))

    assert where(keeper, "AAPL", M) == "ledger"
    assert keeper.watermark == M


def test_when_spool_and_ledger_both_refuse_the_minute_is_held_and_the_watermark_waits(
    keeper: SlotKeeper, disk: FullDisk
) -> None:
    disk.spool = disk.ledger = True
    with capture_logs() as logs:
        assert not keeper.settle(Settlement(M, [quote("AAPL", M)], {"MSFT": "failed"}))
        assert not keeper.settle(Settlement(M + 60, [quote("AAPL", M + 60)]))

    assert keeper.held_minutes == 2 and keeper.held_records == 2
    assert keeper.ledger.watermark() == M - 60  # a crash now: the next start ledgers M, M+60
    said = [e for e in logs if e["event"] == "slots.not_durable" and e["log_level"] == "error"]
    assert len(said) == 1  # said once, not at every retry

    disk.spool = disk.ledger = False
    assert keeper.settle(Settlement(M + 120))

    assert keeper.held_minutes == 0 and keeper.watermark == M + 120
    assert where(keeper, "AAPL", M) == where(keeper, "AAPL", M + 60) == "spool"
    assert where(keeper, "MSFT", M) == "ledger"


def test_memory_is_bounded_while_the_disk_refuses_and_released_minutes_become_windows(
    keeper: SlotKeeper, disk: FullDisk
) -> None:
    disk.spool = disk.ledger = True
    minutes = [M + 60 * i for i in range(MAX_HELD_SETTLEMENTS + 5)]
    for minute in minutes:
        keeper.settle(Settlement(minute, [quote("AAPL", minute)]))
    assert keeper.held_minutes == MAX_HELD_SETTLEMENTS

    disk.spool = disk.ledger = False
    keeper.flush()

    for minute in minutes[:5]:  # released while full: every symbol of it is a window slot now
        for symbol in SYMBOLS:
            assert where(keeper, symbol, minute) == "ledger"
    reasons = {(s, m): r for s, m, r in keeper.open_slots()}
    assert reasons[("MSFT", minutes[0])] == DISK_REFUSED
    assert all(where(keeper, "AAPL", m) == "spool" for m in minutes[5:])


def test_minutes_no_cycle_ran_for_are_ledgered_at_the_next_settle(keeper: SlotKeeper) -> None:
    """Issue 8.3: after a pause, the scheduler ran once for the current minute only."""
    keeper.settle(Settlement(M))
    keeper.settle(Settlement(M + 240))  # M+60 .. M+180 never had a cycle

    reasons = {(s, m): r for s, m, r in keeper.open_slots()}
    assert set(reasons) == {(s, M + 60 * i) for s in SYMBOLS for i in (1, 2, 3)}
    assert set(reasons.values()) == {NO_CYCLE}
    assert len(keeper.ledger.windows()) == len(SYMBOLS)  # one row per symbol, not per slot


def test_a_restart_puts_the_downtime_in_windows_and_asks_for_a_catch_up(tmp_path: Path) -> None:
    keeper = make_keeper(tmp_path)
    assert keeper.account_downtime(M)  # a fresh directory: catch up on the minute under way
    keeper.settle(Settlement(M))
    keeper.ledger.close()

    again = make_keeper(tmp_path)
    assert again.account_downtime(M + 600)

    slots = {(s, m) for s, m, _ in again.open_slots()}
    assert slots == {(s, M + 60 * i) for s in SYMBOLS for i in range(1, 10)}
    assert {r for _, _, r in again.open_slots()} == {NOT_RUNNING}
    assert not again.account_downtime(M + 540)  # already accounted: no second catch-up


def test_a_downtime_longer_than_three_days_is_bounded_and_said(tmp_path: Path) -> None:
    keeper = make_keeper(tmp_path, symbols=["AAPL"])
    keeper.account_downtime(M)
    keeper.ledger.close()

    again = make_keeper(tmp_path, symbols=["AAPL"])
    later = M + MAX_LOOKBACK_S + 3_600
    with capture_logs() as logs:
        again.account_downtime(later)

    assert again.ledger.count() == MAX_LOOKBACK_S // 60
    assert "ledger.downtime_too_old" in [e["event"] for e in logs]


def test_heal_releases_a_slot_only_once_its_record_is_delivered_or_spooled(
    keeper: SlotKeeper, disk: FullDisk
) -> None:
    """Issue 8.5: backfill resolved slots before the spool write that then failed."""
    keeper.settle(Settlement(M, failed=dict.fromkeys(SYMBOLS, "quote failed")))
    delivered = [gap_record("AAPL", M, "no candle", M + 300)]
    refused = [gap_record("MSFT", M, "no candle", M + 300)]
    disk.spool = True

    heal = keeper.heal(delivered, refused)

    assert (heal.resolved, heal.kept) == (1, 1)
    assert where(keeper, "AAPL", M) == "nowhere"  # delivered: the ledger may forget it
    assert where(keeper, "MSFT", M) == "ledger"  # neither delivered nor spooled: kept
    assert where(keeper, "AMZN", M) == "ledger"


def test_windows_expand_a_day_of_a_symbol_at_a_time_without_losing_a_slot(
    tmp_path: Path,
) -> None:
    keeper = make_keeper(tmp_path)
    keeper.account_downtime(M)
    keeper.ledger.close()
    again = make_keeper(tmp_path)
    again.account_downtime(M + 2 * 86_400)  # M never settled: 3 symbols x 2,880 minutes
    before = set(again.open_slots())

    moved = again.expand(3_000)

    assert moved == 1_440 + 1_440 + 120  # one day each of two symbols, the rest of the budget
    assert set(again.open_slots()) == before
    assert again.ledger.count() == len(before) == 3 * 2_880


def test_a_deploys_catch_up_polls_only_what_the_stopped_process_had_not_asked_for(
    tmp_path: Path,
) -> None:
    """A SIGTERM mid-cycle: the quotes already asked for are delivered (or spooled), the rest
    ledgered as stopped, and the minute is settled. The process that takes over within that
    minute polls just the stopped ones, so no symbol is asked for twice in the minute and none
    arrives twice; one started in a later minute leaves them to candles."""
    stopped = make_keeper(tmp_path)
    assert stopped.account_downtime(M) == SYMBOLS  # a first start: the whole minute
    stopped.settle(Settlement(M, failed=dict.fromkeys(["AMZN", "MSFT"], STOPPED_REASON)))
    assert stopped.watermark == M  # AAPL was delivered: the minute is accounted for
    stopped.ledger.close()

    standby = make_keeper(tmp_path, max_bytes=400)  # room for one record, not two
    assert standby.account_downtime(M) == ["MSFT", "AMZN"]  # in the configured order
    standby.settle(Settlement(M, [quote("MSFT", M), quote("AMZN", M)], filled=["MSFT", "AMZN"]))

    assert standby.watermark == M
    assert {s: where(standby, s, M) for s in SYMBOLS} == {
        "AAPL": "nowhere",  # delivered by the stopped process, not asked for again
        "MSFT": "spool",  # filled by the catch-up: released from the ledger
        "AMZN": "ledger",  # refused by the full spool: still a gap
    }
    # Only AMZN is left to ask for in this minute: it is nowhere but in the ledger.
    assert standby.account_downtime(M) == ["AMZN"]
    assert standby.account_downtime(M + 60) == SYMBOLS  # a new minute: all of it
