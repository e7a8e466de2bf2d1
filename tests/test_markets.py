"""Market hours from the XNYS calendar: session edges, early closes, holidays, weekends."""

from __future__ import annotations

import datetime as dt
import itertools
import subprocess
import sys
from zoneinfo import ZoneInfo

import pytest

from finnstream.markets import MarketHours, MarketHoursError

NY = ZoneInfo("America/New_York")


def ny(day: str, hhmm: str) -> int:
    """Epoch seconds of `hhmm` New York time on `day` (YYYY-MM-DD)."""
    return int(dt.datetime.fromisoformat(f"{day}T{hhmm}").replace(tzinfo=NY).timestamp())


@pytest.fixture(scope="module")
def hours() -> MarketHours:
    return MarketHours("XNYS", today=dt.date(2024, 12, 1))


@pytest.mark.parametrize(
    ("day", "hhmm", "is_open"),
    [
        ("2024-11-27", "09:29", False),
        ("2024-11-27", "09:30", True),
        ("2024-11-27", "15:59", True),
        ("2024-11-27", "16:00", False),
        ("2024-07-10", "09:30", True),  # summer time: same New York hours
        ("2024-07-10", "16:00", False),
        ("2024-11-29", "12:59", True),  # early close, 13:00
        ("2024-11-29", "13:00", False),
        ("2024-12-25", "10:00", False),  # Christmas
        ("2024-07-04", "10:00", False),  # Independence Day
        ("2024-11-30", "10:00", False),  # Saturday
        ("2024-12-01", "10:00", False),  # Sunday
    ],
)
def test_is_open(hours: MarketHours, day: str, hhmm: str, is_open: bool) -> None:
    assert hours.is_open(ny(day, hhmm)) is is_open


def test_open_minutes_of_a_normal_day(hours: MarketHours) -> None:
    minutes = hours.open_minutes(ny("2024-11-27", "00:00"), ny("2024-11-28", "00:00"))

    assert len(minutes) == 390
    assert minutes[0] == ny("2024-11-27", "09:30")
    assert minutes[-1] == ny("2024-11-27", "15:59")
    assert all(b - a == 60 for a, b in itertools.pairwise(minutes))


def test_open_minutes_across_a_holiday_week(hours: MarketHours) -> None:
    # Mon 25 .. Sun Dec 1 2024: Thanksgiving (28) closed, early close (29) at 13:00.
    minutes = hours.open_minutes(ny("2024-11-25", "00:00"), ny("2024-12-02", "00:00"))

    assert len(minutes) == 3 * 390 + 210
    assert ny("2024-11-29", "12:59") in minutes
    assert ny("2024-11-29", "13:00") not in minutes
    assert minutes == sorted(minutes)


def test_open_minutes_is_half_open_and_aligned(hours: MarketHours) -> None:
    start, end = ny("2024-11-27", "09:29") + 30, ny("2024-11-27", "09:33")

    assert hours.open_minutes(start, end) == [
        ny("2024-11-27", "09:30"),
        ny("2024-11-27", "09:31"),
        ny("2024-11-27", "09:32"),
    ]
    assert hours.open_minutes(end, start) == []
    assert hours.open_minutes(ny("2024-12-25", "00:00"), ny("2024-12-26", "00:00")) == []


def test_agrees_with_open_minutes_minute_by_minute(hours: MarketHours) -> None:
    start, end = ny("2024-11-26", "00:00"), ny("2024-11-30", "00:00")

    expected = [m for m in range(start, end, 60) if hours.is_open(m)]

    assert hours.open_minutes(start, end) == expected


def test_dates_outside_the_loaded_range_extend_it() -> None:
    hours = MarketHours("XNYS", years=1, today=dt.date(2024, 12, 1))

    assert hours.is_open(ny("2021-12-27", "10:00"))  # a Monday, three years back
    assert not hours.is_open(ny("2021-12-24", "10:00"))  # Christmas observed
    assert hours.covers[0] <= dt.date(2021, 12, 24)


def test_unknown_exchange_is_a_clear_error() -> None:
    with pytest.raises(MarketHoursError, match="XNOPE"):
        MarketHours("XNOPE")


def test_importing_finnstream_markets_does_not_import_pandas() -> None:
    code = "import sys, finnstream.markets; sys.exit('pandas' in sys.modules)"

    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
