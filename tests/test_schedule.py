"""Cron parsing, fire times over known UTC ranges, and the Ticker's choice of minute slot."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest

from finnstream.clock import FakeClock
from finnstream.schedule import Tick, Ticker, cron_matches, fire_times, parse_cron


def utc(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp())


MON_1430 = utc("2024-06-17T14:30:00")  # a Monday
assert MON_1430 == 1_718_634_600


def ticker(cron: str = "* * * * *", **kwargs: object) -> Ticker:
    return Ticker(cron, clock=FakeClock(start=MON_1430), **kwargs)  # type: ignore[arg-type]


# --- parse_cron ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "hint"),
    [
        ("61 * * * *", "61"),
        ("* 24 * * *", "24"),
        ("* * 32 * *", "32"),
        ("* * * 13 *", "13"),
        ("* * *", "3"),
        ("* * * * * *", "6"),
        ("", "5"),
        ("every minute", "2"),
        ("* * * * 8", "8"),
        ("a b c d e", "a"),
    ],
)
def test_parse_cron_rejects_bad_expressions_naming_them(expr: str, hint: str) -> None:
    with pytest.raises(ValueError, match="5-field cron") as info:
        parse_cron(expr)

    assert repr(expr) in str(info.value)
    assert hint in str(info.value)


@pytest.mark.parametrize(
    "expr", ["* * * * *", "*/5 * * * *", "0 14 * * mon-fri", "30 9-16 * * mon", "0 0 1 1 *"]
)
def test_parse_cron_accepts_valid_expressions(expr: str) -> None:
    parse_cron(expr)


# --- fire_times and cron_matches -------------------------------------------------------------


def test_every_minute_fires_each_minute_of_the_half_open_range() -> None:
    trigger = parse_cron("* * * * *")

    assert fire_times(trigger, MON_1430, MON_1430 + 300) == [MON_1430 + 60 * i for i in range(5)]
    assert fire_times(trigger, MON_1430, MON_1430) == []
    assert fire_times(trigger, MON_1430, MON_1430 + 1) == [MON_1430]


def test_a_start_inside_a_minute_begins_at_the_next_minute() -> None:
    trigger = parse_cron("* * * * *")

    assert fire_times(trigger, MON_1430 + 1, MON_1430 + 180) == [MON_1430 + 60, MON_1430 + 120]
    assert fire_times(trigger, MON_1430 - 1, MON_1430 + 60) == [MON_1430]


def test_every_five_minutes_over_half_an_hour() -> None:
    trigger = parse_cron("*/5 * * * *")

    assert fire_times(trigger, MON_1430, utc("2024-06-17T15:00:00")) == [
        utc("2024-06-17T14:30:00"),
        utc("2024-06-17T14:35:00"),
        utc("2024-06-17T14:40:00"),
        utc("2024-06-17T14:45:00"),
        utc("2024-06-17T14:50:00"),
        utc("2024-06-17T14:55:00"),
    ]
    assert fire_times(trigger, MON_1430 + 60, MON_1430 + 300) == []


def test_fire_times_cross_midnight_utc() -> None:
    trigger = parse_cron("*/30 * * * *")

    assert fire_times(trigger, utc("2024-06-17T23:00:00"), utc("2024-06-18T01:00:00")) == [
        utc("2024-06-17T23:00:00"),
        utc("2024-06-17T23:30:00"),
        utc("2024-06-18T00:00:00"),
        utc("2024-06-18T00:30:00"),
    ]


def test_cron_matches() -> None:
    every_five = parse_cron("*/5 * * * *")
    afternoons = parse_cron("0 14 * * *")

    assert cron_matches(every_five, MON_1430)
    assert cron_matches(every_five, MON_1430 + 300)
    assert not cron_matches(every_five, MON_1430 + 60)
    assert cron_matches(afternoons, utc("2024-06-22T14:00:00"))
    assert not cron_matches(afternoons, utc("2024-06-17T14:01:00"))


def test_weekday_names_select_weekdays() -> None:
    trigger = parse_cron("0 14 * * mon-fri")

    assert fire_times(trigger, utc("2024-06-17T00:00:00"), utc("2024-06-24T00:00:00")) == [
        utc(f"2024-06-{day}T14:00:00") for day in range(17, 22)
    ]


def test_numeric_weekdays_1_to_5_are_monday_to_friday_as_in_crontab() -> None:
    """crontab(5): day of week 0-7, 0 or 7 is Sunday; so `1-5` is Monday to Friday."""
    trigger = parse_cron("0 14 * * 1-5")

    assert fire_times(trigger, utc("2024-06-17T00:00:00"), utc("2024-06-24T00:00:00")) == [
        utc(f"2024-06-{day}T14:00:00") for day in range(17, 22)
    ]
    assert cron_matches(trigger, utc("2024-06-17T14:00:00"))  # Monday
    assert not cron_matches(trigger, utc("2024-06-22T14:00:00"))  # Saturday


@pytest.mark.parametrize("sunday", ["0", "7"])
def test_numeric_sunday_is_sunday_as_in_crontab(sunday: str) -> None:
    trigger = parse_cron(f"0 0 * * {sunday}")

    assert fire_times(trigger, utc("2024-06-17T00:00:00"), utc("2024-06-24T00:00:00")) == [
        utc("2024-06-23T00:00:00")
    ]


# --- day of month OR day of week, as in crontab ---------------------------------------------


def test_day_of_month_and_day_of_week_both_restricted_fire_on_either() -> None:
    """crontab(5): `0 12 1 * 1` runs at noon on the 1st and on every Monday."""
    trigger = parse_cron("0 12 1 * 1")

    assert fire_times(trigger, utc("2024-06-01T00:00:00"), utc("2024-07-02T00:00:00")) == [
        utc(f"2024-{day}T12:00:00")
        for day in ("06-01", "06-03", "06-10", "06-17", "06-24", "07-01")
    ]
    assert cron_matches(trigger, utc("2024-06-03T12:00:00"))  # a Monday, not the 1st
    assert cron_matches(trigger, utc("2024-06-01T12:00:00"))  # the 1st, a Saturday
    assert not cron_matches(trigger, utc("2024-06-04T12:00:00"))


@pytest.mark.parametrize(
    ("expr", "days"),
    [
        ("0 12 */2 * 1", ["06-03", "06-17"]),  # a field starting with * is not restricted: AND
        ("0 12 * * 1", ["06-03", "06-10", "06-17", "06-24"]),
        ("0 12 1,15 * *", ["06-01", "06-15"]),
        ("0 12 1 * */1", ["06-01"]),
    ],
)
def test_a_field_starting_with_a_star_leaves_the_other_one_alone(
    expr: str, days: list[str]
) -> None:
    trigger = parse_cron(expr)

    assert fire_times(trigger, utc("2024-06-01T00:00:00"), utc("2024-06-30T00:00:00")) == [
        utc(f"2024-{day}T12:00:00") for day in days
    ]


async def test_the_ticker_schedules_an_either_day_cron() -> None:
    t = ticker("0 12 1 * 1")  # the clock reads Monday 2024-06-17 14:30

    assert t.next_fire_wall == utc("2024-06-24T12:00:00")
    t.start()
    try:
        assert t.alive
    finally:
        t.stop()
    t.fire(utc("2024-06-24T12:00:00.1"), 1.0)
    assert t.next_fire_wall == utc("2024-07-01T12:00:00")


# --- expressions that never fire ------------------------------------------------------------


@pytest.mark.parametrize(
    "expr", ["* * 31 2 *", "0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 30,31 2 *", "0 0 31 2 */2"]
)
def test_an_expression_that_never_fires_is_rejected(expr: str) -> None:
    with pytest.raises(ValueError, match="never fires") as info:
        parse_cron(expr)

    assert repr(expr) in str(info.value)


@pytest.mark.parametrize(
    "expr", ["0 0 29 2 *", "0 0 31 2 1", "0 0 31 * *", "0 0 31 1-12/2 *", "0 0 29 2 mon"]
)
def test_rare_but_real_expressions_are_accepted_quickly(expr: str) -> None:
    started = time.perf_counter()

    trigger = parse_cron(expr)

    assert time.perf_counter() - started < 0.1
    assert fire_times(trigger, utc("2024-01-01T00:00:00"), utc("2032-03-02T00:00:00"))


def test_february_29th_fires_only_in_leap_years() -> None:
    trigger = parse_cron("0 0 29 2 *")

    assert fire_times(trigger, utc("2024-01-01T00:00:00"), utc("2033-01-01T00:00:00")) == [
        utc("2024-02-29T00:00:00"),
        utc("2028-02-29T00:00:00"),
        utc("2032-02-29T00:00:00"),
    ]


def test_rejecting_a_never_firing_expression_is_quick() -> None:
    started = time.perf_counter()

    with pytest.raises(ValueError, match="never fires"):
        parse_cron("* * 31 2 *")

    assert time.perf_counter() - started < 0.1


# --- Ticker ----------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0.0, 0.004, 1.5, 59.9, 59.999])
async def test_fire_queues_the_slot_the_wall_clock_falls_in(offset: float) -> None:
    t = ticker()

    t.fire(MON_1430 + offset, mono=12.5)

    assert t.pending() == 1
    tick = await asyncio.wait_for(t.next_tick(), timeout=1.0)
    assert tick == Tick(minute=MON_1430, fired_mono=12.5, fired_wall=MON_1430 + offset)
    assert t.pending() == 0


async def test_ticks_come_out_in_order() -> None:
    t = ticker()

    t.fire(MON_1430 + 0.01, 1.0)
    t.fire(MON_1430 + 60.02, 61.0)

    assert [(await t.next_tick()).minute for _ in range(2)] == [MON_1430, MON_1430 + 60]


def test_fire_skips_when_the_market_is_closed() -> None:
    asked: list[int] = []

    def closed(minute: int) -> bool:
        asked.append(minute)
        return False

    t = ticker(is_open=closed)
    t.fire(MON_1430 + 0.3, 5.0)

    assert t.pending() == 0
    assert asked == [MON_1430]


def test_fire_queues_when_the_market_is_open() -> None:
    t = ticker(is_open=lambda minute: minute >= MON_1430)

    t.fire(MON_1430 - 60 + 0.2, 1.0)
    t.fire(MON_1430 + 0.2, 61.0)

    assert t.pending() == 1


def test_an_every_minute_ticker_is_overdue_after_two_silent_minutes() -> None:
    t = ticker()
    t.fire(MON_1430 + 0.1, 1.0)

    assert t.overdue(MON_1430 + 100) < 0
    assert t.overdue(MON_1430 + 125) > 0


def test_a_daily_ticker_is_not_overdue_hours_after_its_fire() -> None:
    t = ticker("0 14 * * *")
    t.fire(utc("2024-06-17T14:00:00.2"), 1.0)

    assert t.overdue(utc("2024-06-17T20:00:00")) < 0
    assert t.overdue(utc("2024-06-18T14:05:00")) < 0
    assert t.overdue(utc("2024-06-19T14:05:00")) > 0


def test_a_closed_market_tick_still_counts_as_the_scheduler_firing() -> None:
    t = ticker(is_open=lambda minute: False)
    for i in range(10):
        t.fire(MON_1430 + 60 * i + 0.1, float(i))

    assert t.pending() == 0
    assert t.overdue(MON_1430 + 60 * 9 + 30) < 0


async def test_start_and_stop_the_scheduler() -> None:
    t = ticker()
    assert not t.alive

    t.start()
    try:
        assert t.alive
    finally:
        t.stop()

    assert not t.alive
    t.stop()  # idempotent
