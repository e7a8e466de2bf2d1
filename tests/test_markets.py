"""Market hours from the XNYS calendar: session edges, early closes, holidays, weekends."""

from __future__ import annotations

import datetime as dt
import itertools
import subprocess
import sys
from zoneinfo import ZoneInfo

import pytest

from finnstream.markets import MarketHours, MarketHoursError, Session

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


def test_sessions_of_a_holiday_week(hours: MarketHours) -> None:
    # Mon 25 .. Mon Dec 2 2024: Thanksgiving (28) closed, the day after closes at 13:00.
    sessions = hours.sessions(dt.date(2024, 11, 25), dt.date(2024, 12, 2))

    assert sessions == [
        Session(dt.date(2024, 11, 25), ny("2024-11-25", "09:30"), ny("2024-11-25", "16:00")),
        Session(dt.date(2024, 11, 26), ny("2024-11-26", "09:30"), ny("2024-11-26", "16:00")),
        Session(dt.date(2024, 11, 27), ny("2024-11-27", "09:30"), ny("2024-11-27", "16:00")),
        Session(dt.date(2024, 11, 29), ny("2024-11-29", "09:30"), ny("2024-11-29", "13:00")),
        Session(dt.date(2024, 12, 2), ny("2024-12-02", "09:30"), ny("2024-12-02", "16:00")),
    ]


@pytest.mark.parametrize(
    ("day", "close"),
    [
        ("2025-01-09", None),  # closed for President Carter's national day of mourning
        ("2025-04-18", None),  # Good Friday
        ("2025-07-03", "13:00"),  # early close before Independence Day
        ("2025-07-04", None),
        ("2025-12-24", "13:00"),
        ("2025-12-26", "16:00"),
        ("2025-03-10", "16:00"),  # the Monday after the switch to summer time
    ],
)
def test_sessions_of_known_days(hours: MarketHours, day: str, close: str | None) -> None:
    date = dt.date.fromisoformat(day)

    expected = [] if close is None else [Session(date, ny(day, "09:30"), ny(day, close))]

    assert hours.sessions(date, date) == expected


def test_sessions_hold_exactly_the_open_minutes(hours: MarketHours) -> None:
    first, last = dt.date(2024, 11, 1), dt.date(2025, 1, 31)

    from_sessions = [
        m for s in hours.sessions(first, last) for m in range(s.open_minute, s.close_minute, 60)
    ]

    assert from_sessions == hours.open_minutes(ny("2024-11-01", "00:00"), ny("2025-02-01", "00:00"))


def test_sessions_of_an_empty_or_reversed_range(hours: MarketHours) -> None:
    assert hours.sessions(dt.date(2024, 11, 30), dt.date(2024, 12, 1)) == []  # a weekend
    assert hours.sessions(dt.date(2024, 12, 2), dt.date(2024, 11, 25)) == []


@pytest.mark.parametrize(
    ("first", "last"), [("1969-12-01", "1970-01-31"), ("2200-12-01", "2201-01-31")]
)
def test_sessions_outside_the_holiday_rules_are_refused(
    hours: MarketHours, first: str, last: str
) -> None:
    # exchange_calendars has holiday rules for 1970..2200 only: beyond, Christmas is a session.
    with pytest.raises(MarketHoursError, match=r"1970-01-01 to 2200-12-31"):
        hours.sessions(dt.date.fromisoformat(first), dt.date.fromisoformat(last))


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
