"""A registered secret never reaches a log line: in any value, nested, or in an exception."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from finnstream import logs

TOKEN = "s3cr3t-token"


@pytest.fixture(autouse=True)
def _isolated_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh secret registry and structlog's defaults back afterwards."""
    monkeypatch.setattr(logs, "_secrets", set())
    yield
    structlog.reset_defaults()


def configured(fmt: str) -> io.StringIO:
    buf = io.StringIO()
    logs.register_secret(TOKEN)
    logs.configure_logging("INFO", fmt, stream=buf)
    return buf


def log_everything(*, exceptions: bool = True) -> None:
    """Log the token in the event, a value, a nested dict, a list, an object and an exception."""
    log = structlog.get_logger("finnstream.test")
    url = f"https://finnhub.io/api/v1/quote?symbol=AAPL&token={TOKEN}"
    log.info(f"request {url}", url=url)
    log.warning(
        "finnhub.answer",
        nested={"request": {"headers": {"X-Finnhub-Token": TOKEN}}, "status": 401},
        attempts=[url, ("retry", TOKEN)],
        error=ValueError(f"bad token {TOKEN}"),
        count=3,
    )
    if not exceptions:
        return
    message = f"401 Unauthorized for token={TOKEN}"
    try:
        raise RuntimeError(message)
    except RuntimeError:
        log.exception("quote.failed", symbol="AAPL")
    try:
        raise ConnectionError(message)
    except ConnectionError as exc:
        log.error("quote.failed_again", exc_info=exc)


def test_json_logs_never_show_the_token() -> None:
    buf = configured("json")

    log_everything()

    out = buf.getvalue()
    assert TOKEN not in out
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in lines] == [
        "request https://finnhub.io/api/v1/quote?symbol=AAPL&token=***",
        "finnhub.answer",
        "quote.failed",
        "quote.failed_again",
    ]
    assert lines[0]["url"].endswith("token=***")
    assert lines[1]["nested"] == {"request": {"headers": {"X-Finnhub-Token": "***"}}, "status": 401}
    assert lines[1]["attempts"] == [
        "https://finnhub.io/api/v1/quote?symbol=AAPL&token=***",
        ["retry", "***"],
    ]
    assert lines[1]["error"] == "bad token ***"
    assert lines[1]["count"] == 3
    assert "RuntimeError: 401 Unauthorized for token=***" in lines[2]["exception"]
    assert "ConnectionError: 401 Unauthorized for token=***" in lines[3]["exception"]
    assert lines[2]["symbol"] == "AAPL"


def test_console_values_never_show_the_token() -> None:
    buf = configured("console")

    log_everything(exceptions=False)

    out = buf.getvalue()
    assert "finnhub.answer" in out
    assert "token=***" in out
    assert "'X-Finnhub-Token': '***'" in out
    assert TOKEN not in out


def test_console_logs_never_show_the_token() -> None:
    buf = configured("console")

    log_everything()

    out = buf.getvalue()
    assert "quote.failed" in out
    assert TOKEN not in out


def test_console_exception_text_is_redacted() -> None:
    buf = configured("console")
    log = structlog.get_logger("finnstream.test")

    try:
        raise RuntimeError(f"401 for token={TOKEN}")
    except RuntimeError:
        log.exception("quote.failed")

    out = buf.getvalue()
    assert "RuntimeError: 401 for token=***" in out
    assert TOKEN not in out


def test_scrub_replaces_every_registered_secret() -> None:
    logs.register_secret(TOKEN)
    logs.register_secret("other-secret")
    logs.register_secret("")  # an empty secret would redact everything: ignored

    assert logs.scrub(f"a {TOKEN} b other-secret c {TOKEN}") == "a *** b *** c ***"
    assert logs.scrub("nothing here") == "nothing here"


def test_level_filters_below_the_configured_level() -> None:
    buf = io.StringIO()
    logs.configure_logging("WARNING", "json", stream=buf)
    log = structlog.get_logger("finnstream.test")

    log.info("cycle.done", delivered=3)
    log.warning("cycle.late", lag_s=2.5)

    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [(e["event"], e["level"]) for e in events] == [("cycle.late", "warning")]
    assert events[0]["lag_s"] == 2.5
    assert events[0]["timestamp"].endswith("Z")


@pytest.mark.parametrize("short", ["a", "60", "AAPL", "seven!!"])
def test_a_value_too_short_to_be_a_token_is_not_redacted_and_a_warning_says_so(
    short: str,
) -> None:
    with capture_logs() as events:
        assert logs.register_secret(short) is False
    buf = io.StringIO()
    logs.configure_logging("INFO", "json", stream=buf)
    text = "a cycle of 60 AAPL quotes: xxxxxxx done"

    structlog.get_logger("finnstream.test").info("cycle.done", note=text)

    assert logs.scrub(text) == text
    assert json.loads(buf.getvalue())["note"] == text
    assert events == [
        {
            "event": "secret.too_short_to_redact",
            "log_level": "warning",
            "length": len(short),
            "min_length": logs.MIN_SECRET_LEN,
            "hint": "Finnhub tokens are 20 characters: check the secret's value",
        }
    ]


def test_a_value_of_the_minimum_length_is_redacted() -> None:
    secret = "k" * logs.MIN_SECRET_LEN

    assert logs.register_secret(secret) is True
    assert logs.scrub(f"token {secret}!") == "token ***!"
