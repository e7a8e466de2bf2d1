"""The gap ledger: gaps in and out, attempts, the last completed slot, corrupt files."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from finnstream.errors import FinnstreamError
from finnstream.ledger import Gap, GapLedger, LedgerError, ranges_by_symbol

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


def test_open_gaps_ordered_by_minute_then_symbol_with_limit(ledger: GapLedger) -> None:
    ledger.add([("MSFT", M + 60), ("AAPL", M + 60), ("ZZZ", M), ("AMZN", M + 120)], "r")

    order = [(g.minute, g.symbol) for g in ledger.open_gaps()]

    assert order == [(M, "ZZZ"), (M + 60, "AAPL"), (M + 60, "MSFT"), (M + 120, "AMZN")]
    assert [g.symbol for g in ledger.open_gaps(limit=2)] == ["ZZZ", "AAPL"]
    assert ledger.open_gaps(limit=0) == []


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


def test_thousands_of_slots_in_one_call(ledger: GapLedger) -> None:
    slots = [(f"S{i % 50}", M + 60 * (i // 50)) for i in range(20_000)]

    assert ledger.add(slots, reason="outage") == 20_000
    ledger.record_attempt(slots, reason="candles: 429")
    ledger.resolve(slots[:15_000])

    assert ledger.count() == 5_000
    assert {g.attempts for g in ledger.open_gaps()} == {1}


def test_last_completed_slot_only_moves_forward(ledger: GapLedger) -> None:
    assert ledger.last_completed_slot() is None

    ledger.set_last_completed_slot(M)
    ledger.set_last_completed_slot(M - 60)
    assert ledger.last_completed_slot() == M

    ledger.set_last_completed_slot(M + 120)
    assert ledger.last_completed_slot() == M + 120


def test_state_survives_reopen(tmp_path: Path) -> None:
    with GapLedger(tmp_path) as ledger:
        ledger.add([("AAPL", M)], reason="spool full")
        ledger.record_attempt([("AAPL", M)], reason="candles: empty")
        ledger.set_last_completed_slot(M + 60)

    with GapLedger(tmp_path) as reopened:
        assert reopened.open_gaps() == [Gap("AAPL", M, 1, "candles: empty")]
        assert reopened.last_completed_slot() == M + 60


def test_file_is_wal_with_full_sync(tmp_path: Path) -> None:
    ledger = GapLedger(tmp_path)
    ledger.add([("AAPL", M)], reason="r")

    path = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("SELECT count(*) FROM gaps").fetchone()[0] == 1
    ledger.close()


def test_corrupt_file_gives_a_clear_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 200)

    with pytest.raises(LedgerError) as info:
        GapLedger(tmp_path)

    assert isinstance(info.value, FinnstreamError)
    assert str(path) in str(info.value)
    assert "move it aside" in str(info.value)


def test_use_after_close_is_a_clear_error(tmp_path: Path) -> None:
    ledger = GapLedger(tmp_path)
    ledger.close()
    ledger.close()

    with pytest.raises(LedgerError, match="closed"):
        ledger.count()


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
