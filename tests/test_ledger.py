"""The gap ledger: gap slots, windows, the watermark, one transaction per write, old files."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from finnstream.errors import FinnstreamError
from finnstream.ledger import (
    Gap,
    GapLedger,
    LedgerError,
    LedgerWrite,
    NewWindow,
    ranges_by_symbol,
)

M = 1_718_000_040  # a minute slot


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[GapLedger]:
    with GapLedger(tmp_path) as ledger:
        yield ledger


def test_add_counts_only_new_gaps_and_keeps_attempts(ledger: GapLedger) -> None:
    assert ledger.add([("AAPL", M), ("MSFT", M)], reason="kinesis: outage") == 2
    ledger.record_attempt([("AAPL", M)], reason="candles: empty")

    assert ledger.add([("AAPL", M), ("AAPL", M + 60), ("AAPL", M + 60)], reason="again") == 1

    assert ledger.count() == 3
    assert ledger.open_gaps() == [
        Gap("AAPL", M, 1, "candles: empty"),
        Gap("MSFT", M, 0, "kinesis: outage"),
        Gap("AAPL", M + 60, 0, "again"),
    ]


def test_pages_walk_symbol_then_minute_up_to_the_horizon(ledger: GapLedger) -> None:
    ledger.add([("MSFT", M + 60), ("AAPL", M + 60), ("ZZZ", M), ("AAPL", M + 600)], "r")

    first = ledger.page(None, horizon=M + 300, limit=2)
    rest = ledger.page((first[-1].symbol, first[-1].minute), horizon=M + 300, limit=2)

    assert [(g.symbol, g.minute) for g in first] == [("AAPL", M + 60), ("MSFT", M + 60)]
    assert [(g.symbol, g.minute) for g in rest] == [("ZZZ", M)]  # AAPL at M+600 is too new


def test_fresh_only_pages_skip_slots_already_tried(ledger: GapLedger) -> None:
    ledger.add([("AAPL", M), ("MSFT", M)], "r")
    ledger.record_attempt([("AAPL", M)], "no candle")

    assert [g.symbol for g in ledger.page(None, M, 10, fresh_only=True)] == ["MSFT"]
    assert [g.symbol for g in ledger.page(None, M, 10)] == ["AAPL", "MSFT"]


def test_record_attempt_increments_and_updates_reason(ledger: GapLedger) -> None:
    ledger.add([("AAPL", M)], reason="spool full")

    ledger.record_attempt([("AAPL", M), ("AAPL", M)], reason="candles: timeout")
    ledger.record_attempt([("AAPL", M), ("NOPE", M)], reason="candles: no bar")

    assert ledger.open_gaps() == [Gap("AAPL", M, 2, "candles: no bar")]
    assert ledger.count() == 1  # attempts on an unknown slot add nothing


def test_resolve_removes_filled_slots(ledger: GapLedger) -> None:
    ledger.add([("AAPL", M), ("AAPL", M + 60), ("MSFT", M)], reason="r")

    ledger.resolve([("AAPL", M), ("MSFT", M), ("NOPE", M)])

    assert ledger.open_gaps() == [Gap("AAPL", M + 60, 0, "r")]
    assert ledger.count() == 1


def test_thousands_of_slots_in_one_call(ledger: GapLedger) -> None:
    slots = [(f"S{i % 50}", M + 60 * (i // 50)) for i in range(20_000)]

    assert ledger.add(slots, reason="outage") == 20_000
    ledger.record_attempt(slots, reason="candles: 429")
    ledger.resolve(slots[:15_000])

    assert ledger.count() == 5_000
    assert {g.attempts for g in ledger.open_gaps()} == {1}


def test_one_commit_is_one_transaction(ledger: GapLedger) -> None:
    """A settle writes the failed slots, a window and the watermark together, or nothing."""
    broken = NewWindow("MSFT", M, M + 60, "down", None)  # type: ignore[arg-type]
    write = LedgerWrite(
        watermark=M + 120, windows=[NewWindow("AAPL", M, M + 60, "down", 2), broken]
    )
    write.add_gaps([("MSFT", M + 120)], "quote failed")

    with pytest.raises(LedgerError):
        ledger.commit(write)

    assert ledger.count() == 0 and ledger.windows() == [] and ledger.watermark() is None


def test_the_watermark_only_moves_forward(ledger: GapLedger) -> None:
    assert ledger.watermark() is None

    ledger.commit(LedgerWrite(watermark=M))
    ledger.commit(LedgerWrite(watermark=M - 60))
    assert ledger.watermark() == M

    ledger.commit(LedgerWrite(watermark=M + 120))
    assert ledger.watermark() == M + 120


def test_a_window_stands_for_its_slots_and_expands_in_chunks(ledger: GapLedger) -> None:
    day = 24 * 60
    ledger.commit(
        LedgerWrite(windows=[NewWindow("AAPL", M, M + 60 * (2 * day - 1), "down", 2 * day)])
    )
    assert ledger.count() == 2 * day and ledger.gap_slots == 0
    (window,) = ledger.windows()

    moved = ledger.expand_window(window, [M + 60 * i for i in range(day)])

    (rest,) = ledger.windows()
    assert moved == day and ledger.gap_slots == day and ledger.window_slots == day
    assert rest.first == M + 60 * day and rest.slots == day
    assert ledger.count() == 2 * day  # nothing lost, nothing doubled on the way
    ledger.expand_window(rest, [M + 60 * (day + i) for i in range(day)])
    assert ledger.windows() == [] and ledger.count() == ledger.gap_slots == 2 * day


def test_a_window_with_no_expected_minute_left_is_dropped(ledger: GapLedger) -> None:
    ledger.commit(LedgerWrite(windows=[NewWindow("AAPL", M, M + 600, "down", 11)]))
    (window,) = ledger.windows()

    assert ledger.expand_window(window, []) == 0

    assert ledger.windows() == [] and ledger.count() == 0


def test_state_and_counts_survive_reopen(tmp_path: Path) -> None:
    with GapLedger(tmp_path) as ledger:
        ledger.add([("AAPL", M)], reason="spool full")
        ledger.record_attempt([("AAPL", M)], reason="candles: empty")
        ledger.commit(
            LedgerWrite(watermark=M + 60, windows=[NewWindow("MSFT", M, M + 60, "down", 2)])
        )

    with GapLedger(tmp_path) as reopened:
        assert reopened.open_gaps() == [Gap("AAPL", M, 1, "candles: empty")]
        assert reopened.watermark() == M + 60
        assert reopened.count() == 3


def test_file_is_a_rollback_journal_never_wal_so_it_is_safe_on_nfs(tmp_path: Path) -> None:
    ledger = GapLedger(tmp_path)
    ledger.add([("AAPL", M)], reason="r")

    path = tmp_path / "ledger.sqlite3"
    header = path.read_bytes()[:100]
    assert header[18:20] == b"\x01\x01"  # file format: rollback journal (2 would be WAL)
    assert not (tmp_path / "ledger.sqlite3-wal").exists()
    assert not (tmp_path / "ledger.sqlite3-shm").exists()
    ledger.close()


def test_a_version_1_ledger_is_migrated_keeping_its_gaps_and_completed_slot(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite3"
    with closing(sqlite3.connect(path, isolation_level=None)) as old:  # as 0.1.0 wrote it
        old.execute("PRAGMA journal_mode = WAL")
        old.executescript(
            """
            CREATE TABLE gaps (minute INTEGER NOT NULL, symbol TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL,
                PRIMARY KEY (minute, symbol)) WITHOUT ROWID;
            CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
            PRAGMA user_version = 1;
            """
        )
        old.execute("INSERT INTO gaps VALUES (?, 'AAPL', 2, 'quote failed')", (M,))
        old.execute("INSERT INTO meta VALUES ('last_completed_slot', ?)", (M + 60,))
        old.execute("INSERT INTO meta VALUES ('last_started_slot', ?)", (M + 120,))

    with GapLedger(tmp_path) as ledger:
        assert ledger.open_gaps() == [Gap("AAPL", M, 2, "quote failed")]
        # The started-but-unfinished minute is after the watermark: the next run ledgers it.
        assert ledger.watermark() == M + 60
    with closing(sqlite3.connect(path)) as after:
        assert after.execute("PRAGMA user_version").fetchone()[0] == 2
    assert path.read_bytes()[18:20] == b"\x01\x01"  # no longer WAL


def test_corrupt_file_gives_a_clear_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 200)

    with pytest.raises(LedgerError) as info:
        GapLedger(tmp_path)

    assert isinstance(info.value, FinnstreamError)
    assert str(path) in str(info.value)
    assert "move it aside" in str(info.value)


def test_a_newer_schema_is_refused_clearly(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / "ledger.sqlite3")) as newer:
        newer.execute("PRAGMA user_version = 99")

    with pytest.raises(LedgerError, match="newer than this finnstream"):
        GapLedger(tmp_path)


def test_use_after_close_is_a_clear_error(tmp_path: Path) -> None:
    ledger = GapLedger(tmp_path)
    ledger.close()
    ledger.close()

    with pytest.raises(LedgerError, match="closed"):
        ledger.open_gaps()


def gaps(symbol: str, *minutes: int) -> list[Gap]:
    return [Gap(symbol, m, 0, "r") for m in minutes]


def test_ranges_by_symbol_merges_consecutive_minutes() -> None:
    found = ranges_by_symbol(
        [
            *gaps("MSFT", M + 600),
            *gaps("AAPL", M + 120, M, M + 60, M + 300, M + 360, M + 60),
            *gaps("MSFT", M, M + 60),
        ]
    )

    assert found == {
        "AAPL": [(M, M + 120), (M + 300, M + 360)],
        "MSFT": [(M, M + 60), (M + 600, M + 600)],
    }
    assert list(found) == ["AAPL", "MSFT"]
    assert ranges_by_symbol([]) == {}


def test_a_slot_one_write_both_ledgers_and_resolves_stays_ledgered(ledger: GapLedger) -> None:
    """A catch-up cycle resolves what it filled; a record of it the full spool refused is ledgered
    in the same write: the gap wins, or the slot would be nowhere."""
    write = LedgerWrite(resolve=[("AAPL", M), ("MSFT", M)])
    write.add_gaps([("AAPL", M)], "spool full")

    ledger.commit(write)

    assert [(g.symbol, g.minute) for g in ledger.open_gaps()] == [("AAPL", M)]
