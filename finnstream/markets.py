"""Market hours from a maintained exchange calendar (`exchange_calendars`).

`MarketHours("XNYS")` knows the regular session of each day, holidays and early closes
included, from the calendar's own schedule (its own time zone handling: everything here is epoch
seconds). The minute starting at `minute` is open when `session open <= minute < session close`
(and not inside a lunch break, for exchanges that have one): on a normal NYSE day the minutes
starting 09:30 to 15:59 New York time are open, 16:00 is not.

The session table is built once, as sorted epoch-second intervals, so `is_open` is a binary
search and `open_minutes` only walks the sessions that overlap its range; `sessions` lists the
trading days themselves (what `finnstream sessions` prints for Athena's gap report). The calendar
covers `years` years either side of today (default 2) and is rebuilt, lazily and with the same
margin, when asked about a minute outside that window; a date the calendar itself cannot cover
raises `MarketHoursError`, and so does `sessions` outside the years the calendar has holiday rules
for (`known`), where it would list every weekday.

`exchange_calendars` (and pandas) are imported only when a `MarketHours` is created, so importing
finnstream stays light when `schedule.market_hours_only` is off.
"""

from __future__ import annotations

import bisect
import datetime as dt
import warnings
from typing import Any, NamedTuple

import structlog

from finnstream.clock import MINUTE_S
from finnstream.errors import FinnstreamError

log = structlog.get_logger(__name__)

DEFAULT_EXCHANGE = "XNYS"
DEFAULT_YEARS = 2
_DAY_S = 86_400


class MarketHoursError(FinnstreamError):
    """The exchange calendar is unknown or does not cover the dates asked about."""


class Session(NamedTuple):
    """One regular trading interval: its first minute slot and its close (exclusive), epoch s."""

    trading_day: dt.date
    open_minute: int
    close_minute: int


def _epoch(ts: Any) -> int:
    return int(ts.timestamp())


def _day(epoch_s: int) -> dt.date:
    return dt.datetime.fromtimestamp(epoch_s, tz=dt.UTC).date()


class MarketHours:
    """Regular-session hours of one exchange, as epoch-second intervals."""

    def __init__(
        self,
        exchange: str = DEFAULT_EXCHANGE,
        *,
        years: int = DEFAULT_YEARS,
        today: dt.date | None = None,
    ) -> None:
        if years < 1:
            raise ValueError("years must be at least 1")
        self.exchange = exchange
        self._margin = dt.timedelta(days=366 * years)
        center = today or dt.datetime.now(tz=dt.UTC).date()
        self._opens: list[int] = []
        self._closes: list[int] = []
        self._days: list[dt.date] = []  # the trading day (session label) of each interval
        self._known = (dt.date.min, dt.date.max)  # the years the calendar has holiday rules for
        self._first = self._last = center
        self._load(center - self._margin, center + self._margin)

    @property
    def covers(self) -> tuple[dt.date, dt.date]:
        """The first and last calendar day the loaded session table covers."""
        return self._first, self._last

    def is_open(self, minute: int) -> bool:
        """Is the regular session open during the minute starting at epoch `minute`?"""
        self._ensure(minute, minute)
        i = bisect.bisect_right(self._opens, minute) - 1
        return i >= 0 and minute < self._closes[i]

    def open_minutes(self, start: int, end: int) -> list[int]:
        """Minute slots in [start, end) during the regular session, ascending."""
        if end <= start:
            return []
        self._ensure(start, end - 1)
        first = _first_slot(start)
        i = max(0, bisect.bisect_right(self._opens, first) - 1)
        minutes: list[int] = []
        while i < len(self._opens) and self._opens[i] < end:
            lo = max(first, _first_slot(self._opens[i]))
            minutes.extend(range(lo, min(end, self._closes[i]), MINUTE_S))
            i += 1
        return minutes

    @property
    def known(self) -> tuple[dt.date, dt.date]:
        """The first and last day the calendar has holiday rules for: outside them, every
        weekday would look like a session."""
        return self._known

    def sessions(self, first: dt.date, last: dt.date) -> list[Session]:
        """The regular sessions of the trading days in [first, last], ascending.

        Holidays have none; early closes end early. A day with a lunch break has two intervals,
        one row each, so the rows always hold exactly the minutes `open_minutes` counts.
        Days outside `known` raise `MarketHoursError` rather than list holidays as sessions.
        """
        if last < first:
            return []
        known_first, known_last = self._known
        if first < known_first or last > known_last:
            raise MarketHoursError(
                f"the {self.exchange} calendar knows holidays from {known_first} to {known_last} "
                f"only, not {first} to {last}"
            )
        self._ensure(_midnight(first), _midnight(last))
        lo = bisect.bisect_left(self._days, first)
        hi = bisect.bisect_right(self._days, last)
        return [
            Session(day, _first_slot(open_), close)
            for day, open_, close in zip(
                self._days[lo:hi], self._opens[lo:hi], self._closes[lo:hi], strict=True
            )
        ]

    def _ensure(self, lo: int, hi: int) -> None:
        """Reload the calendar if [lo, hi] reaches outside the loaded days."""
        lo_day, hi_day = _day(lo), _day(hi)
        if self._first <= lo_day and hi_day <= self._last:
            return
        first = min(self._first, lo_day - self._margin)
        last = max(self._last, hi_day + self._margin)
        log.info(
            "markets.calendar_extended", exchange=self.exchange, first=str(first), last=str(last)
        )
        self._load(first, last)

    def _load(self, first: dt.date, last: dt.date) -> None:
        import exchange_calendars as xcals  # noqa: PLC0415 (pulls in pandas: import on use)

        try:
            with warnings.catch_warnings():
                # exchange_calendars on pandas 3 warns about pandas' own future changes; the
                # calendar is read once here and the warnings say nothing to an operator.
                warnings.simplefilter("ignore", DeprecationWarning)
                calendar = xcals.get_calendar(self.exchange, start=first, end=last)
                days, opens, closes = _intervals(calendar.schedule)
        except (xcals.errors.CalendarError, ValueError) as exc:
            raise MarketHoursError(
                f"the {self.exchange} calendar cannot cover {first} to {last}: {exc}"
            ) from exc
        self._days, self._opens, self._closes = days, opens, closes
        rules = calendar.regular_holidays
        if rules is not None:
            self._known = (rules.start_date.date(), rules.end_date.date())
        self._first, self._last = first, last


def _first_slot(epoch_s: int) -> int:
    """The first minute slot at or after `epoch_s`."""
    return -(-epoch_s // MINUTE_S) * MINUTE_S


def _midnight(day: dt.date) -> int:
    return int(dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC).timestamp())


def _intervals(schedule: Any) -> tuple[list[dt.date], list[int], list[int]]:
    """Sorted (trading days, opens, closes) of each trading interval, epoch seconds; a break
    splits a session in two intervals of the same day."""
    has_break = (schedule["break_start"].notna() & schedule["break_end"].notna()).tolist()
    rows = zip(
        schedule.index.date,
        schedule["open"],
        schedule["break_start"],
        schedule["break_end"],
        schedule["close"],
        has_break,
        strict=True,
    )
    days: list[dt.date] = []
    opens: list[int] = []
    closes: list[int] = []
    for day, open_, break_start, break_end, close, broken in rows:
        pieces = [(open_, break_start), (break_end, close)] if broken else [(open_, close)]
        for start, stop in pieces:
            days.append(day)
            opens.append(_epoch(start))
            closes.append(_epoch(stop))
    return days, opens, closes
