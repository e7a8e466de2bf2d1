"""CloudWatch metrics as an operator finds them: Embedded Metric Format lines on stdout.

What is checked is what CloudWatch needs to make a metric of a line and what the alarms in
deploy/cloudformation.yaml read: the namespace, the one dimension set, each metric declared with
its unit and present as a top-level key; one line per cycle, with the right numbers after real
cycles against the simulator and moto; counts since the previous line that include what the
spool drainer and the backfiller delivered in between; the standby's `Active` = 0; and no such
line at all for people reading console logs.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from finnstream.app import CycleReport
from finnstream.clock import minute_slot
from finnstream.emf import NAMESPACE, cycle_values, emf_line
from finnstream.ledger import GapLedger
from finnstream.simulator import Simulator

from .conftest import (
    TOKEN,
    Aws,
    ConfigFactory,
    ShiftedClock,
    aligned_offset,
    early_in_a_minute,
    subprocess_env,
)
from .faults import KinesisFaults, patched_kinesis
from .test_backfill import cli
from .test_faults import new_app

ROOT = Path(__file__).resolve().parents[1]
# Units CloudWatch accepts in an EMF directive.
CLOUDWATCH_UNITS = {
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes",
    "Terabytes", "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count",
    "Bytes/Second", "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second",
    "Terabytes/Second", "Bits/Second", "Kilobits/Second", "Megabits/Second", "Gigabits/Second",
    "Terabits/Second", "Count/Second", "None",
}  # fmt: skip
# The metrics and units the alarms and the README promise (issue 10).
SPEC_UNITS = {
    **dict.fromkeys(
        ("SlotsExpected", "QuotesOk", "QuotesFailed", "QuotesUnknown", "RecordsDelivered"), "Count"
    ),
    **dict.fromkeys(("RecordsSpooled", "GapsPublished", "GapsOpen", "SpoolDepth"), "Count"),
    "CycleSeconds": "Seconds",
    "ScheduleLagSeconds": "Seconds",
    "TokenValid": "None",
    "Active": "None",
}
CYCLE_METRICS = set(SPEC_UNITS)
CYCLE_METRICS_CATCH_UP = CYCLE_METRICS - {"ScheduleLagSeconds"}
Line = dict[str, Any]


def assert_valid_emf(line: Line) -> dict[str, float]:
    """What CloudWatch checks before it makes metrics of a log event; returns the metrics."""
    aws = line["_aws"]
    assert isinstance(aws["Timestamp"], int) and aws["Timestamp"] > 1_000_000_000_000  # ms
    [directive] = aws["CloudWatchMetrics"]
    assert directive["Namespace"] == NAMESPACE == "Finnstream"
    assert directive["Dimensions"] == [["Stream", "Shard"]]
    for key in ("Stream", "Shard"):
        assert isinstance(line[key], str) and line[key]
    values = {}
    for metric in directive["Metrics"]:
        name, unit = metric["Name"], metric["Unit"]
        assert unit in CLOUDWATCH_UNITS and unit == SPEC_UNITS[name], metric
        value = line[name]
        assert isinstance(value, int | float) and not isinstance(value, bool), (name, value)
        assert math.isfinite(value), (name, value)
        values[name] = value
    assert len(values) == len(directive["Metrics"]) <= 100
    return values


def emf_lines(text: str) -> list[Line]:
    """The EMF lines of a process's stdout; every line of it must be one JSON object."""
    out = []
    for raw in text.splitlines():
        if '"_aws"' in raw:
            line = json.loads(raw)
            assert isinstance(line, dict)
            out.append(line)
    return out


def report(**changes: Any) -> CycleReport:
    fields: dict[str, Any] = {
        "minute": 1_750_000_020,
        "symbols": 5,
        "published": 3,
        "delivered": 3,
        "undelivered": 0,
        "spooled": 0,
        "failed": 1,
        "unknown": 1,
        "lag_s": 0.0123,
        "took_s": 1.23456,
        "on_time": True,
    }
    fields.update(changes)
    return CycleReport(**fields)


# ---- the line itself: pure functions, no I/O --------------------------------------------------


def test_a_cycle_line_is_valid_emf_with_every_metric_and_its_unit() -> None:
    since = {"RecordsDelivered": 7, "RecordsSpooled": 2, "GapsPublished": 1}
    gauges = {"GapsOpen": 4, "SpoolDepth": 2, "TokenValid": 1}
    values = cycle_values(report(), since, gauges)
    text = emf_line(1_750_000_020_000, {"Stream": "quotes", "Shard": "0"}, values, {"x": 1})
    assert "\n" not in text
    line = json.loads(text)
    assert assert_valid_emf(line) == {
        "SlotsExpected": 5,
        "QuotesOk": 3,
        "QuotesFailed": 1,
        "QuotesUnknown": 1,
        "RecordsDelivered": 7,
        "RecordsSpooled": 2,
        "GapsPublished": 1,
        "GapsOpen": 4,
        "SpoolDepth": 2,
        "CycleSeconds": 1.235,
        "ScheduleLagSeconds": 0.0123,
        "TokenValid": 1,
        "Active": 1,
    }
    assert line["_aws"]["Timestamp"] == 1_750_000_020_000
    assert (line["Stream"], line["Shard"], line["x"]) == ("quotes", "0", 1)
    declared = line["_aws"]["CloudWatchMetrics"][0]["Metrics"]
    assert {m["Name"]: m["Unit"] for m in declared} == SPEC_UNITS


def test_a_catch_up_cycle_has_no_schedule_lag_and_zero_counts_are_written() -> None:
    zero = {"RecordsDelivered": 0, "RecordsSpooled": 0, "GapsPublished": 0}
    values = cycle_values(report(on_time=False, lag_s=37.5), zero, {"TokenValid": 0})
    assert "ScheduleLagSeconds" not in values  # 37.5 s into the minute is not a lag
    assert values["RecordsDelivered"] == 0 and values["TokenValid"] == 0


def test_a_line_refuses_metric_names_the_alarms_do_not_know() -> None:
    with pytest.raises(ValueError, match="Typo"):
        emf_line(0, {"Stream": "s", "Shard": "0"}, {"Typo": 1})
    with pytest.raises(ValueError, match="not an EMF line"):
        emf_line(0, {"Stream": "s"}, {"Active": 1})


def test_every_metric_an_alarm_reads_is_one_the_daemon_writes() -> None:
    template = (ROOT / "deploy" / "cloudformation.yaml").read_text()
    read = set(re.findall(r"Namespace: Finnstream\s+MetricName: (\w+)", template))
    assert read == {
        "SlotsExpected",
        "RecordsDelivered",
        "SpoolDepth",
        "GapsPublished",
        "TokenValid",
    }
    assert read <= CYCLE_METRICS_CATCH_UP  # in every cycle's line, catch-up cycles included


# ---- real cycles against the simulator and moto ------------------------------------------------


async def test_run_once_writes_one_line_with_the_cycles_numbers(
    make_config: ConfigFactory,
    aws: Aws,
    sim: Simulator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sim.settings.fail_quote_symbols = frozenset({"FAIL"})
    path = make_config(["AAPL", "MSFT", "ZZZZ", "FAIL"], shard={"index": 0, "count": 1})
    async with new_app(path, aws) as app:
        reports: list[CycleReport] = []
        app.cycle_listeners.append(reports.append)
        capsys.readouterr()
        assert await app.run_once() == 0
        [cycle] = reports
    [line] = emf_lines(capsys.readouterr().out)
    values = assert_valid_emf(line)
    assert set(values) == CYCLE_METRICS_CATCH_UP
    assert values == {
        "SlotsExpected": 4,
        "QuotesOk": 2,
        "QuotesFailed": 1,  # FAIL: its slot is in the gap ledger
        "QuotesUnknown": 1,  # ZZZZ
        "RecordsDelivered": 2,
        "RecordsSpooled": 0,
        "GapsPublished": 0,
        "GapsOpen": 1,
        "SpoolDepth": 0,
        "CycleSeconds": round(cycle.took_s, 3),
        "TokenValid": 1,
        "Active": 1,
    }
    assert (line["Stream"], line["Shard"]) == (aws.stream, "0")
    assert line["_aws"]["Timestamp"] == cycle.minute * 1000
    assert len(aws.records()) == 2


async def test_counts_since_the_previous_line_include_the_drainer_and_the_backfiller(
    make_config: ConfigFactory,
    aws: Aws,
    sim: Simulator,
    wall: ShiftedClock,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two daemon cycles. In between, the backfiller publishes a gap record while Kinesis is
    down (it is spooled), then the spool drainer delivers it and the first cycle's quotes."""
    old = minute_slot(wall.time()) - 600
    with GapLedger(tmp_path / "spool") as ledger:
        ledger.add([("AAPL", old)], "quote failed")
    path = make_config(["AAPL", "MSFT"], backfill={"enabled": False})
    async with new_app(path, aws, wall) as app:
        capsys.readouterr()
        with patched_kinesis(KinesisFaults(outage=True)):
            await app.run_cycle(minute_slot(wall.time()))
            await app.backfiller.run_once()  # the gap record cannot be delivered: spooled
        assert app.spool.depth_records == 3
        assert await app.drainer.drain_all(app.stopping)
        wall.offset += 60
        await app.run_cycle(minute_slot(wall.time()))
        metrics_text = app.metrics.render().decode()
    first, second = (assert_valid_emf(line) for line in emf_lines(capsys.readouterr().out))
    assert set(first) == set(second) == CYCLE_METRICS
    assert {k: first[k] for k in ("RecordsDelivered", "RecordsSpooled", "SpoolDepth")} == {
        "RecordsDelivered": 0,
        "RecordsSpooled": 2,
        "SpoolDepth": 2,
    }
    assert (first["GapsPublished"], first["GapsOpen"]) == (0, 1)
    assert {k: second[k] for k in ("RecordsDelivered", "RecordsSpooled", "SpoolDepth")} == {
        "RecordsDelivered": 2 + 1 + 2,  # drained quotes, drained gap record, this cycle's quotes
        "RecordsSpooled": 1,  # the gap record, spooled after the first line
        "SpoolDepth": 0,
    }
    assert (second["GapsPublished"], second["GapsOpen"]) == (1, 0)
    # One source of truth: the lines add up to what /metrics says.
    delivered = sum(
        float(row.rsplit(" ", 1)[1])
        for row in metrics_text.splitlines()
        if row.startswith("finnstream_records_delivered_total")
    )
    assert delivered == first["RecordsDelivered"] + second["RecordsDelivered"]
    assert sorted(r["source"] for r in aws.records()) == ["gap", "quote", "quote", "quote", "quote"]


async def test_a_catch_up_cycle_reports_its_own_duration(
    make_config: ConfigFactory,
    aws: Aws,
    sim: Simulator,
    wall: ShiftedClock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Started 40 s into its minute (a restart), the cycle takes well under a second: that is
    its CycleSeconds, not the 40 s since its minute began."""
    wall.offset = aligned_offset(40.0)
    async with new_app(make_config(), aws, wall) as app:
        reports: list[CycleReport] = []
        done = asyncio.Event()
        app.cycle_listeners.append(lambda r: (reports.append(r), done.set()))
        capsys.readouterr()
        daemon = asyncio.create_task(app.run_forever())
        await asyncio.wait_for(done.wait(), 20)
        app.request_stop()
        assert await asyncio.wait_for(daemon, 10) == 0
    [cycle] = reports
    assert not cycle.on_time and cycle.delivered == 3
    assert cycle.took_s < 10  # its minute began 40 s before it started
    [line] = emf_lines(capsys.readouterr().out)
    values = assert_valid_emf(line)
    assert values["CycleSeconds"] == round(cycle.took_s, 3)
    assert "ScheduleLagSeconds" not in values
    assert values["SlotsExpected"] == values["RecordsDelivered"] == 3


async def test_console_logs_carry_no_metrics_lines(
    make_config: ConfigFactory, aws: Aws, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    async with new_app(make_config(log={"format": "console"}), aws) as app:
        assert app.emf is None
        assert await app.run_once() == 0
    out = capsys.readouterr().out
    assert "cycle.done" in out
    assert "_aws" not in out and "CloudWatchMetrics" not in out


# ---- the standby -----------------------------------------------------------------------------


async def test_a_standby_writes_active_0_and_no_cycle_metrics(
    make_config: ConfigFactory, aws: Aws, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make_config()
    async with new_app(path, aws) as active:
        standby = new_app(path, aws)
        capsys.readouterr()
        starting = asyncio.create_task(standby.start())
        lines: list[Line] = []
        async with asyncio.timeout(20):
            while not lines:
                await asyncio.sleep(0.05)
                lines += emf_lines(capsys.readouterr().out)
        standby.request_stop()
        await asyncio.wait_for(starting, 10)
        assert await standby.run_forever() == 0
        await standby.close()
        assert active.active and not standby.active
    [line] = lines
    assert assert_valid_emf(line) == {"Active": 0}
    assert (line["Stream"], line["Shard"]) == (aws.stream, "0")
    assert line["event"] == "metrics.standby"


# ---- real processes --------------------------------------------------------------------------


async def test_run_once_process_stdout_is_json_lines_with_one_metrics_line(
    make_config: ConfigFactory, aws: Aws, sim: Simulator, wall: ShiftedClock
) -> None:
    wall.offset = 0.0  # a real process on the real clock: so is the simulator
    await early_in_a_minute()
    code, text, err = await cli("run", "--once", "--config", str(make_config()), aws=aws)
    assert code == 0, err
    assert TOKEN not in text + err
    events = [json.loads(row) for row in text.splitlines()]  # every line one JSON object
    [line] = [e for e in events if "_aws" in e]
    [done] = [e for e in events if e.get("event") == "cycle.done"]
    values = assert_valid_emf(line)
    assert set(values) == CYCLE_METRICS_CATCH_UP
    assert values["SlotsExpected"] == values["QuotesOk"] == values["RecordsDelivered"] == 3
    assert values["CycleSeconds"] == done["took_s"]
    assert line["_aws"]["Timestamp"] == done["minute"] * 1000


async def test_a_standby_process_writes_active_0_and_exits_0_on_sigterm(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    path = make_config()
    async with new_app(path, aws):  # holds the spool lock
        env = subprocess_env(AWS_ENDPOINT_URL=aws.url)
        command = (sys.executable, "-m", "finnstream", "run", "--config", str(path))
        pipe = asyncio.subprocess.PIPE
        proc = await asyncio.create_subprocess_exec(*command, env=env, stdout=pipe, stderr=pipe)
        assert proc.stdout is not None
        seen: list[Line] = []
        async with asyncio.timeout(30):
            while not any("_aws" in e for e in seen):
                row = await proc.stdout.readline()
                assert row, "the standby ended early"
                seen.append(json.loads(row))
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    seen += [json.loads(row) for row in out.decode().splitlines()]
    [line] = [e for e in seen if "_aws" in e]
    assert assert_valid_emf(line) == {"Active": 0}
    assert "lock.standby" in [e.get("event") for e in seen]
