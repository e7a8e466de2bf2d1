"""The command line without AWS: time arguments, exit codes, and what check-config prints."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from finnstream.cli import main, parse_time, scrub_url

T = 1_718_634_600  # 2024-06-17T14:30:00Z


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No stray FINNSTREAM_* override or FINNHUB_TOKEN from the developer's shell."""
    for name in list(os.environ):
        if name.startswith(("FINNSTREAM_", "FINNHUB_")):
            monkeypatch.delenv(name)
    yield
    structlog.reset_defaults()


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "finnstream.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# --- parse_time ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "2024-06-17T14:30:00Z",
        "2024-06-17T16:30:00+02:00",
        "2024-06-17T10:30:00-04:00",
        "2024-06-17T14:30:00",  # naive means UTC
        "2024-06-17 14:30:00",
        "1718634600",
        "1718634600.75",
        " 1718634600 ",
    ],
)
def test_parse_time_accepts_iso_and_epoch(text: str) -> None:
    assert parse_time(text) == T


def test_parse_time_of_a_date_is_midnight_utc() -> None:
    assert parse_time("2024-06-17") == T - (14 * 3600 + 30 * 60)


@pytest.mark.parametrize("text", ["garbage", "", "2024-13-01T00:00:00Z", "nan", "inf", "1e400"])
def test_parse_time_rejects_garbage_as_an_argument_error(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time(text)


@pytest.mark.parametrize("bad", ["garbage", "inf"])
def test_backfill_with_a_bad_time_exits_2_without_traceback(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["backfill", "--start", bad, "--end", "1"])

    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "--start" in err
    assert repr(bad) in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nonsense"],
        ["backfill", "--start", "1"],
        ["tail", "--limit", "0"],
        ["backfill", "--start", "1", "--end", "2", "--symbols", " , "],
    ],
)
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)

    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_backfill_end_before_start_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, "symbols: [AAPL]\n")

    code = main(["backfill", "--config", str(path), "--start", str(T), "--end", str(T - 60)])

    assert code == 2
    assert "--end must be after --start" in one_line(capsys.readouterr().err)


# --- sessions --------------------------------------------------------------------------------


def test_sessions_prints_the_calendar_as_csv(capsys: pytest.CaptureFixture[str]) -> None:
    # Thanksgiving week 2024: Thursday closed, Friday closes at 13:00 New York (18:00 UTC).
    code = main(["sessions", "--start", "2024-11-26", "--end", "2024-11-29"])

    captured = capsys.readouterr()
    assert code == 0
    assert captured.err == ""
    assert captured.out == (
        "trading_day,open_minute,close_minute\n"
        "2024-11-26,1732631400,1732654800\n"  # 14:30 to 21:00 UTC
        "2024-11-27,1732717800,1732741200\n"
        "2024-11-29,1732890600,1732903200\n"  # 14:30 to 18:00 UTC
    )


def test_sessions_of_a_holiday_is_the_header_alone(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sessions", "--start", "2025-12-25", "--end", "2025-12-25"]) == 0
    assert capsys.readouterr().out == "trading_day,open_minute,close_minute\n"


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2025-06-20", "2025-06-16", "--end 2025-06-16 is before --start 2025-06-20"),
        ("2201-01-01", "2201-01-31", "knows holidays from 1970-01-01 to 2200-12-31 only"),
        ("1960-01-01", "2025-01-31", "knows holidays from 1970-01-01 to 2200-12-31 only"),
    ],
)
def test_sessions_range_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], start: str, end: str, message: str
) -> None:
    code = main(["sessions", "--start", start, "--end", end])

    captured = capsys.readouterr()
    assert code == 2
    assert message in one_line(captured.err)
    assert captured.out == ""


@pytest.mark.parametrize("bad", ["2025-13-01", "2025-02-30", "yesterday", "1718634600", ""])
def test_sessions_with_a_bad_date_exits_2_naming_it(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["sessions", "--start", bad, "--end", "2025-06-20"])

    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"argument --start: {bad!r} is not a date (YYYY-MM-DD)" in err


# --- check-config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("symbols: [AAPL]\nkinesis: {stream_nam: x}\n", "kinesis.stream_nam"),
        ("symbols: [AAPL, AAPL]\n", "symbols"),
        ("symbols: [AAPL]\nfinnhub: {requests_per_minute: 0}\n", "finnhub.requests_per_minute"),
        ("symbols: [AAPL]\nschedule: {cron: '61 * * * *'}\n", "schedule.cron"),
        ("symbols: [AAPL]\nschedule: {cron: '* * 31 2 *'}\n", "schedule.cron"),
        ("symbols: [AAPL\n", "line 2"),
    ],
)
def test_check_config_on_a_bad_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, field: str
) -> None:
    path = write_config(tmp_path, text)

    code = main(["check-config", "--config", str(path)])

    captured = capsys.readouterr()
    assert code == 2
    line = one_line(captured.err)
    assert line.startswith("finnstream: ")
    assert field in line
    assert captured.out == ""


def test_check_config_on_a_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["check-config", "--config", str(tmp_path / "nope.yaml")])

    assert code == 2
    assert "nope.yaml" in one_line(capsys.readouterr().err)


def test_check_config_on_a_bad_env_override_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINNSTREAM_KINESIS__STREAM_NAM", "prod")
    path = write_config(tmp_path, "symbols: [AAPL]\n")

    assert main(["check-config", "--config", str(path)]) == 2
    assert "kinesis.stream_nam" in one_line(capsys.readouterr().err)


def test_check_config_prints_the_resolved_yaml_and_that_it_fits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINNSTREAM_KINESIS__STREAM_NAME", "prod-quotes")
    path = write_config(tmp_path, "symbols: [AAPL, MSFT, BRK.B]\n")

    code = main(["check-config", "--config", str(path)])

    captured = capsys.readouterr()
    assert code == 0
    assert captured.err == ""
    printed: dict[str, Any] = yaml.safe_load(captured.out)  # comment lines are YAML comments
    assert printed["symbols"] == ["AAPL", "MSFT", "BRK.B"]
    assert printed["kinesis"]["stream_name"] == "prod-quotes"
    assert printed["finnhub"]["requests_per_minute"] == 60
    assert printed["schedule"]["cron"] == "* * * * *"
    assert str(path) in captured.out
    assert "3 of 3 symbols" in captured.out
    assert "fits" in captured.out
    assert "DOES NOT FIT" not in captured.out
    assert "Secrets Manager secret finnstream/finnhub" in captured.out


def test_check_config_warns_when_the_symbols_do_not_fit_a_minute(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    symbols = ", ".join(f"S{i}" for i in range(100))
    path = write_config(tmp_path, f"symbols: [{symbols}]\n")

    code = main(["check-config", "--config", str(path)])

    captured = capsys.readouterr()
    assert code == 0
    assert "DOES NOT FIT" in captured.out
    assert "# pace: 59 symbols fit a minute at 30/s and 60/min" in captured.out
    assert "100 symbols do not fit: at most 59 can be requested every minute" in captured.err
    assert "shard.count" in captured.err


def test_check_config_says_the_free_plans_sixty_symbols_do_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    symbols = ", ".join(f"S{i}" for i in range(60))  # each cycle would start 0.2 s later
    path = write_config(tmp_path, f"symbols: [{symbols}]\n")

    assert main(["check-config", "--config", str(path)]) == 0

    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out
    assert "60 symbols do not fit: at most 59" in captured.err


def test_check_config_never_prints_a_token_in_a_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(
        tmp_path,
        "symbols: [AAPL]\n"
        "finnhub: {base_url: 'https://finnhub.io/api/v1?token=abc'}\n"
        "kinesis: {endpoint_url: 'http://user:abc@localhost:4566/?token=abc'}\n",
    )

    code = main(["check-config", "--config", str(path)])

    captured = capsys.readouterr()
    assert code == 0
    assert "abc" not in captured.out + captured.err
    printed = yaml.safe_load(captured.out)
    assert printed["finnhub"]["base_url"].startswith("https://finnhub.io/api/v1")
    assert printed["kinesis"]["endpoint_url"].startswith("http://localhost:4566/")


def test_check_config_says_where_the_token_comes_from_without_its_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINNHUB_TOKEN", "tok-9f8e7d")
    path = write_config(tmp_path, "symbols: [AAPL]\n")

    assert main(["check-config", "--config", str(path)]) == 0

    out = capsys.readouterr().out
    assert "FINNHUB_TOKEN" in out
    assert "tok-9f8e7d" not in out


def test_check_config_finds_the_file_through_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, "symbols: [TSLA]\n")
    monkeypatch.setenv("FINNSTREAM_CONFIG", str(path))

    assert main(["check-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["symbols"] == ["TSLA"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://finnhub.io/api/v1?token=abc", "https://finnhub.io/api/v1?***"),
        ("https://me:abc@finnhub.io/api/v1", "https://finnhub.io/api/v1"),
        ("http://localhost:4566", "http://localhost:4566"),
        ("https://finnhub.io/api/v1#abc", "https://finnhub.io/api/v1"),
    ],
)
def test_scrub_url(url: str, expected: str) -> None:
    assert scrub_url(url) == expected
