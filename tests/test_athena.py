"""deploy/athena/*.sql run on DuckDB over an archive laid out exactly as Firehose writes it.

The queries are Athena engine v3 (Trino) SQL. sqlglot transpiles them to DuckDB and nothing
patches the result; the `?` parameters are bound as DATEs. The archive is gzip JSON Lines under
`quotes/year=/month=/day=/` by ARRIVAL day (UTC), each object one Firehose buffer of records as
the package encodes them (`finnstream.records`), duplicates and late arrivals included.
`finnstream.quotes` has the Glue table's columns, read from the CloudFormation template;
`finnstream.sessions` is the CSV a real `finnstream sessions` process prints.

The week is Thanksgiving 2024: Mon 25, Tue 26, Wed 27, Thu 28 (holiday), Fri 29 (closes 13:00
New York). The report asks for Mon 25 .. Fri 29 and reads folders up to Fri 29 + 7 days
(Fri Dec 6). Times in comments are New York's (UTC-5 that week) unless they say UTC.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import pytest
import sqlglot
from cfnlint.decode import decode
from sqlglot import exp

from finnstream.records import Record, candle_record, gap_record, quote_record

from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
MISSING_SLOTS = ROOT / "deploy" / "athena" / "missing_slots.sql"
QUOTES_LATEST = ROOT / "deploy" / "athena" / "quotes_latest.sql"
TEMPLATE = ROOT / "deploy" / "cloudformation.yaml"
NY = ZoneInfo("America/New_York")

FIRST, LAST = dt.date(2024, 11, 25), dt.date(2024, 11, 29)
WEEK = [FIRST + dt.timedelta(days=i) for i in range(5)]
THANKSGIVING = dt.date(2024, 11, 28)
# The sessions CSV covers more than the report asks for: the query picks the range's days.
CSV_FIRST, CSV_LAST = dt.date(2024, 11, 18), dt.date(2024, 12, 13)

NO_CANDLE = "no candle for this minute"
DOWN = "finnstream was not running; candles are not available on this Finnhub plan (403)"

GLUE_TO_DUCKDB = {
    "int": "INTEGER",
    "bigint": "BIGINT",
    "double": "DOUBLE",
    "string": "VARCHAR",
    "date": "DATE",
}
SESSIONS_COLUMNS = [("trading_day", "date"), ("open_minute", "bigint"), ("close_minute", "bigint")]


def ny(day: dt.date, hhmm: str) -> int:
    """Epoch seconds of `hhmm` New York time on `day`."""
    return int(dt.datetime.combine(day, dt.time.fromisoformat(hhmm), tzinfo=NY).timestamp())


def utc(day: dt.date, hhmm: str) -> float:
    return dt.datetime.combine(day, dt.time.fromisoformat(hhmm), tzinfo=dt.UTC).timestamp()


def athena_to_duckdb(sql: str) -> str:
    """The one place Athena SQL becomes DuckDB SQL: sqlglot's transpile, no text patched after."""
    (statement,) = sqlglot.transpile(sql, read="trino", write="duckdb")
    return statement


# --- the archive, as Firehose writes it --------------------------------------------------------


class FirehoseArchive:
    """S3 objects under quotes/year=/month=/day=/: one per buffer interval of arrivals, the
    records' bytes concatenated as they came and gzipped. Firehose dates an object by its oldest
    record's arrival (UTC); a buffer never spans midnight here."""

    BUFFER_S = 900  # BufferIntervalSeconds at its maximum: the same layout in fewer objects

    def __init__(self) -> None:
        self._buffers: dict[int, list[bytes]] = defaultdict(list)

    def put(self, record: Record, arrived: float) -> None:
        self._buffers[int(arrived // self.BUFFER_S) * self.BUFFER_S].append(record.data)

    def write(self, bucket: Path) -> None:
        for start, datas in sorted(self._buffers.items()):
            t = dt.datetime.fromtimestamp(start, tz=dt.UTC)
            folder = bucket / "quotes" / f"year={t:%Y}" / f"month={t:%m}" / f"day={t:%d}"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"finnstream-quotes-1-{t:%Y-%m-%d-%H-%M-%S}-{uuid.uuid4()}.gz"
            (folder / name).write_bytes(gzip.compress(b"".join(datas)))


def quote(symbol: str, minute: int) -> Record:
    body = {"c": 100.5, "o": 100.0, "h": 101.0, "l": 99.0, "pc": 99.5, "d": 1.0, "dp": 1.005}
    return quote_record(symbol, minute, {**body, "t": minute + 5}, minute + 0.4)


def candle(symbol: str, minute: int, fetched_at: float) -> Record:
    bar = {"o": 100.0, "h": 101.0, "l": 99.0, "c": 100.5, "v": 1200, "t": minute}
    return candle_record(symbol, minute, bar, fetched_at)


def session_minutes(sessions: dict[dt.date, tuple[int, int]], day: dt.date) -> list[int]:
    if day not in sessions:
        return []
    open_minute, close_minute = sessions[day]
    return list(range(open_minute, close_minute, 60))


def build_archive(sessions: dict[dt.date, tuple[int, int]]) -> FirehoseArchive:
    """The week's records (`expected_rows` says what a user expects the report to make of them)."""
    archive = FirehoseArchive()
    days = [dt.date(2024, 11, 22) + dt.timedelta(days=i) for i in range(11)]  # Fri 22 .. Mon Dec 2

    # AAPL (market_hours_only: true): a quote for every session minute, except a few.
    aapl_holes = {ny(FIRST, f"14:0{i}") for i in range(5)} | {ny(LAST, "10:00"), ny(LAST, "10:01")}
    for day in days:
        for m in session_minutes(sessions, day):
            if m not in aapl_holes:
                archive.put(quote("AAPL", m), m + 1)
                if day == WEEK[1]:  # Tuesday is delivered twice (a retried PutRecords)
                    archive.put(quote("AAPL", m), m + 31)
                if day == WEEK[2] and m >= ny(day, "15:55"):  # re-sent from the spool, 03:00 UTC
                    archive.put(quote("AAPL", m), utc(THANKSGIVING, "03:00"))
    # Monday 14:00, 14:01: candles backfilled the next day; 14:02: on Monday Dec 2, within the
    # margin; 14:03: a gap record (twice); 14:04: nothing ever came. Friday 10:00: a candle from a
    # manual backfill in the last folder read (Dec 6), 10:01: in the one after (Dec 7).
    for minute, arrived in [
        (ny(FIRST, "14:00"), utc(WEEK[1], "14:45")),
        (ny(FIRST, "14:01"), utc(WEEK[1], "14:45")),
        (ny(FIRST, "14:02"), utc(dt.date(2024, 12, 2), "09:00")),
        (ny(LAST, "10:00"), utc(dt.date(2024, 12, 6), "23:59")),
        (ny(LAST, "10:01"), utc(dt.date(2024, 12, 7), "00:01")),
    ]:
        archive.put(candle("AAPL", minute, arrived - 2), arrived)
    gap = gap_record("AAPL", ny(FIRST, "14:03"), NO_CANDLE, utc(WEEK[1], "14:46"))
    archive.put(gap, utc(WEEK[1], "14:46"))
    archive.put(gap, utc(WEEK[2], "01:00"))
    # Tuesday 10:00 already has a quote; a manual backfill over it adds a candle.
    archive.put(candle("AAPL", ny(WEEK[1], "10:00"), utc(WEEK[3], "12:00")), utc(WEEK[3], "12:00"))
    # A candle for the Friday before the range, arriving inside it.
    archive.put(candle("AAPL", ny(days[0], "15:00"), utc(FIRST, "13:00")), utc(FIRST, "13:00"))

    # MSFT (market_hours_only: false): every minute of Monday to Saturday, the holiday included,
    # except all of Wednesday, and Friday's last two minutes before the early close.
    for day in [*WEEK, dt.date(2024, 11, 30)]:
        if day == WEEK[2]:
            continue
        start = int(utc(day, "00:00"))
        for m in range(start, start + 86_400, 60):
            if m not in {ny(LAST, "12:58"), ny(LAST, "12:59")}:
                archive.put(quote("MSFT", m), m + 1)  # 23:59 lands in the next day's folder
    # 12:58: a gap record, then a candle after all (filled). 12:59: two gap records, the later
    # one delivered twice; the report gives the later reason.
    archive.put(
        gap_record("MSFT", ny(LAST, "12:58"), NO_CANDLE, utc(LAST, "19:00")), utc(LAST, "19:00")
    )
    archive.put(candle("MSFT", ny(LAST, "12:58"), utc(LAST, "23:00")), utc(LAST, "23:00") + 86_400)
    archive.put(
        gap_record("MSFT", ny(LAST, "12:59"), "HTTP 502", utc(LAST, "19:15")), utc(LAST, "19:15")
    )
    later = gap_record("MSFT", ny(LAST, "12:59"), NO_CANDLE, utc(LAST, "19:30"))
    archive.put(later, utc(LAST, "19:30"))
    archive.put(later, utc(LAST, "19:30") + 86_400)

    # BRK.B: complete. TSLA: records only before and after the range (not expected in it).
    for day in WEEK:
        for m in session_minutes(sessions, day):
            archive.put(quote("BRK.B", m), m + 1)
    for day in (days[0], days[-1]):
        for m in session_minutes(sessions, day):
            archive.put(quote("TSLA", m), m + 1)

    # NVDA: its shard was down all week, on a free plan. Restarted Saturday 30 at 12:00 UTC, it
    # looked back 3 days (to Wednesday 12:00 UTC) and published gap records for Wednesday's and
    # Friday's sessions, all in Saturday's folder. Monday and Tuesday have no record at all.
    restart = utc(dt.date(2024, 11, 30), "12:00")
    for day in (WEEK[2], LAST):
        for m in session_minutes(sessions, day):
            archive.put(gap_record("NVDA", m, DOWN, restart + 60), restart + 61)
    return archive


def expected_rows(sessions: dict[dt.date, tuple[int, int]]) -> set[tuple[Any, ...]]:
    """(symbol, minute, trading_day, gap_reason): what a user expects missing in the week."""
    rows: set[tuple[Any, ...]] = {
        ("AAPL", ny(FIRST, "14:03"), FIRST, NO_CANDLE),
        ("AAPL", ny(FIRST, "14:04"), FIRST, None),
        ("AAPL", ny(LAST, "10:01"), LAST, None),  # its candle arrived past the margin
        ("MSFT", ny(LAST, "12:59"), LAST, NO_CANDLE),
    }
    rows |= {("MSFT", m, WEEK[2], None) for m in session_minutes(sessions, WEEK[2])}
    for day in WEEK:
        reason = DOWN if day in (WEEK[2], LAST) else None
        rows |= {("NVDA", m, day, reason) for m in session_minutes(sessions, day)}
    return rows


# --- the tables Athena reads ---------------------------------------------------------------------


def _template_tables() -> dict[str, dict[str, Any]]:
    decoded, matches = decode(str(TEMPLATE))
    assert not matches, matches
    return {
        res["Properties"]["TableInput"]["Name"]: res["Properties"]["TableInput"]
        for res in decoded["Resources"].values()  # Fn::ForEach entries are lists: not tables
        if isinstance(res, dict) and res["Type"] == "AWS::Glue::Table"
    }


def _struct(columns: list[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"'{name}': '{GLUE_TO_DUCKDB[t]}'" for name, t in columns) + "}"


@pytest.fixture(scope="module")
def sessions_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """s3://<archive bucket>/sessions/sessions.csv, from a real `finnstream sessions`."""
    argv = ["sessions", "--start", str(CSV_FIRST), "--end", str(CSV_LAST)]
    proc = subprocess.run(
        [sys.executable, "-m", "finnstream", *argv],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    path = tmp_path_factory.mktemp("bucket") / "sessions" / "sessions.csv"
    path.parent.mkdir()
    path.write_text(proc.stdout, encoding="utf-8")
    # The same days uploaded again under another name: the table reads every file under sessions/.
    path.with_name("sessions-again.csv").write_text(proc.stdout, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sessions(sessions_csv: Path) -> dict[dt.date, tuple[int, int]]:
    rows = csv.DictReader(io.StringIO(sessions_csv.read_text(encoding="utf-8")))
    return {
        dt.date.fromisoformat(r["trading_day"]): (int(r["open_minute"]), int(r["close_minute"]))
        for r in rows
    }


@pytest.fixture(scope="module")
def athena(
    sessions_csv: Path, sessions: dict[dt.date, tuple[int, int]]
) -> Iterator[duckdb.DuckDBPyConnection]:
    """DuckDB with finnstream.quotes and finnstream.sessions over the bucket's files."""
    bucket = sessions_csv.parents[1]
    build_archive(sessions).write(bucket)
    quotes = _template_tables()["quotes"]
    columns = [(c["Name"], c["Type"]) for c in quotes["StorageDescriptor"]["Columns"]]
    partitions = [(k["Name"], k["Type"]) for k in quotes["PartitionKeys"]]  # strings
    con = duckdb.connect()
    con.execute("CREATE SCHEMA finnstream")
    con.execute(
        f"""CREATE VIEW finnstream.quotes AS SELECT * FROM read_json(
            '{bucket}/quotes/*/*/*/*.gz', format = 'newline_delimited',
            columns = {_struct(columns)},
            hive_partitioning = true, hive_types = {_struct(partitions)})"""
    )
    con.execute(
        f"""CREATE VIEW finnstream.sessions AS SELECT * FROM read_csv(
            '{bucket}/sessions/*.csv', header = true, columns = {_struct(SESSIONS_COLUMNS)})"""
    )
    yield con
    con.close()


def missing_slots(
    con: duckdb.DuckDBPyConnection, first: dt.date, last: dt.date
) -> list[tuple[Any, ...]]:
    sql = athena_to_duckdb(MISSING_SLOTS.read_text(encoding="utf-8"))
    cursor = con.execute(sql, [first, last])
    assert [d[0] for d in cursor.description] == ["symbol", "minute", "trading_day", "gap_reason"]
    return cursor.fetchall()


# --- missing_slots.sql ---------------------------------------------------------------------------


def test_finnstream_sessions_prints_the_table_the_query_reads(sessions_csv: Path) -> None:
    lines = sessions_csv.read_bytes().decode().split("\n")

    assert lines[0] == "trading_day,open_minute,close_minute"
    assert lines[-1] == ""  # every line ends with \n, none with \r\n
    week = {
        line.split(",")[0]: line for line in lines[1:-1] if "2024-11-25" <= line <= "2024-12-01"
    }
    assert sorted(week) == ["2024-11-25", "2024-11-26", "2024-11-27", "2024-11-29"]
    assert week["2024-11-29"] == f"2024-11-29,{ny(LAST, '09:30')},{ny(LAST, '13:00')}"
    assert week["2024-11-25"] == f"2024-11-25,{ny(FIRST, '09:30')},{ny(FIRST, '16:00')}"


def test_the_archive_is_laid_out_by_arrival_day(athena: duckdb.DuckDBPyConnection) -> None:
    folders = athena.execute(
        "SELECT DISTINCT year || '-' || month || '-' || day FROM finnstream.quotes ORDER BY 1"
    ).fetchall()

    assert folders[0] == ("2024-11-22",)
    assert ("2024-12-06",) in folders  # the last folder the report reads for Friday 29
    assert folders[-1] == ("2024-12-07",)  # one past it


@pytest.fixture(scope="module")
def week(athena: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
    return missing_slots(athena, FIRST, LAST)


def test_the_week_reports_exactly_the_slots_a_user_expects(
    week: list[tuple[Any, ...]], sessions: dict[dt.date, tuple[int, int]]
) -> None:
    rows = week

    assert len(rows) == len(set(rows))  # duplicates and several gap records count once
    assert set(rows) == expected_rows(sessions)
    assert rows == sorted(rows, key=lambda r: (r[0], r[1]))
    assert {type(v) for r in rows for v in r[:3]} == {str, int, dt.date}


def test_the_calendar_decides_which_minutes_are_expected(week: list[tuple[Any, ...]]) -> None:
    # NVDA has no record on Monday and Tuesday, and gap records for the rest: every minute.
    nvda = [r for r in week if r[0] == "NVDA"]
    per_day = {day: sum(1 for r in nvda if r[2] == day) for day in WEEK}
    assert per_day == {
        WEEK[0]: 390,
        WEEK[1]: 390,
        WEEK[2]: 390,
        THANKSGIVING: 0,  # the holiday: MSFT's records that day expect nothing
        LAST: 210,  # the early close: 09:30 to 12:59 New York
    }
    assert max(r[1] for r in nvda if r[2] == LAST) == ny(LAST, "12:59")
    assert min(r[1] for r in nvda if r[2] == FIRST) == ny(FIRST, "09:30")
    assert max(r[1] for r in nvda if r[2] == FIRST) == ny(FIRST, "15:59")


def test_one_day_sees_the_symbols_with_a_record_that_day(athena: duckdb.DuckDBPyConnection) -> None:
    wednesday = missing_slots(athena, WEEK[2], WEEK[2])
    tuesday_wednesday = missing_slots(athena, WEEK[1], WEEK[2])

    # NVDA's (late) gap records are on Wednesday. MSFT has no record at all that day, so a
    # one-day range cannot tell it from a symbol never configured: a range with a day it has
    # records on can (the README says to ask for whole weeks).
    assert {(r[0], r[3]) for r in wednesday} == {("NVDA", DOWN)}
    assert len(wednesday) == 390
    assert sum(1 for r in tuesday_wednesday if r[0] == "MSFT" and r[2] == WEEK[2]) == 390


def test_a_holiday_alone_expects_nothing(athena: duckdb.DuckDBPyConnection) -> None:
    assert missing_slots(athena, THANKSGIVING, THANKSGIVING) == []  # MSFT has records that day


def test_symbols_with_no_record_in_the_range_are_not_expected(
    athena: duckdb.DuckDBPyConnection, week: list[tuple[Any, ...]]
) -> None:
    # TSLA has records on the Friday before and the Monday after, in folders the scan reads.
    assert not any(r[0] == "TSLA" for r in week)
    # On Monday Dec 2, AAPL and TSLA are complete; BRK.B, MSFT and NVDA have no record at all.
    assert missing_slots(athena, dt.date(2024, 12, 2), dt.date(2024, 12, 2)) == []


def test_two_date_parameters_each_used_once() -> None:
    tree = sqlglot.parse_one(MISSING_SLOTS.read_text(encoding="utf-8"), read="trino")

    placeholders = list(tree.find_all(exp.Placeholder))
    assert len(placeholders) == 2
    assert MISSING_SLOTS.read_text(encoding="utf-8").count("?") == 2  # none in a comment either
    for p in placeholders:
        assert isinstance(p.parent, exp.Cast)
        assert p.parent.to.is_type("date")


def test_the_sessions_table_in_the_template_is_what_the_query_reads() -> None:
    table = _template_tables().get("sessions")
    if table is None:
        pytest.skip("deploy/cloudformation.yaml defines no finnstream.sessions table yet")
    storage = table["StorageDescriptor"]
    assert [(c["Name"], c["Type"]) for c in storage["Columns"]] == SESSIONS_COLUMNS
    assert storage["Location"] == {"Fn::Sub": "s3://${ArchiveBucket}/sessions/"}
    # OpenCSVSerde reads a DATE only as a count of days since 1970; the CSV says 2024-11-25.
    serde = storage["SerdeInfo"]
    assert serde["SerializationLibrary"] == "org.apache.hadoop.hive.serde2.lazy.LazySimpleSerDe"
    assert serde["Parameters"]["field.delim"] == ","
    assert table["Parameters"]["skip.header.line.count"] == "1"


# --- quotes_latest.sql ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latest(athena: duckdb.DuckDBPyConnection) -> dict[tuple[str, int], dict[str, Any]]:
    athena.execute(athena_to_duckdb(QUOTES_LATEST.read_text(encoding="utf-8")))
    cursor = athena.execute("SELECT * FROM finnstream.quotes_latest")
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    by_slot = {(r["symbol"], r["minute"]): r for r in rows}
    assert len(by_slot) == len(rows)  # one row per symbol and minute
    return by_slot


def test_the_view_has_one_row_per_slot_with_the_record_columns(
    athena: duckdb.DuckDBPyConnection, latest: dict[tuple[str, int], dict[str, Any]]
) -> None:
    (slots,) = athena.execute(
        "SELECT count(*) FROM (SELECT DISTINCT symbol, minute FROM finnstream.quotes)"
    ).fetchone() or (None,)

    assert len(latest) == slots
    columns = [c["Name"] for c in _template_tables()["quotes"]["StorageDescriptor"]["Columns"]]
    assert list(next(iter(latest.values()))) == columns


@pytest.mark.parametrize(
    ("symbol", "day", "hhmm", "source", "reason"),
    [
        ("AAPL", FIRST, "09:30", "quote", None),
        ("AAPL", WEEK[1], "10:00", "quote", None),  # quote over a later candle; sent twice
        ("AAPL", FIRST, "14:00", "candle", None),  # arrived the next day
        ("AAPL", FIRST, "14:03", "gap", NO_CANDLE),  # delivered twice
        ("MSFT", LAST, "12:58", "candle", None),  # candle over an earlier gap record
        ("MSFT", LAST, "12:59", "gap", NO_CANDLE),  # the later of two gap records
        ("NVDA", LAST, "12:59", "gap", DOWN),
    ],
)
def test_the_view_prefers_quote_then_candle_then_gap(
    latest: dict[tuple[str, int], dict[str, Any]],
    symbol: str,
    day: dt.date,
    hhmm: str,
    source: str,
    reason: str | None,
) -> None:
    row = latest[(symbol, ny(day, hhmm))]

    assert (row["source"], row["reason"]) == (source, reason)
