"""Config loading: defaults, the shipped example, env overrides, and one clear error per mistake."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from finnstream.config import (
    Config,
    FinnhubConfig,
    env_overrides,
    load_config,
    minute_capacity,
    resolve_path,
)
from finnstream.errors import EXIT_USAGE, ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "finnstream.yaml"

Write = Callable[[str], Path]


@pytest.fixture
def write(tmp_path: Path) -> Write:
    def make(text: str) -> Path:
        path = tmp_path / "finnstream.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return make


def load(path: Path, **env: str) -> Config:
    cfg, resolved = load_config(path, environ=env)
    assert resolved == path
    return cfg


def config_error(path: Path, **env: str) -> str:
    """Load, expect a ConfigError, check it reads as one plain line, and return its message."""
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env)
    message = str(info.value)
    assert info.value.exit_code == EXIT_USAGE == 2
    assert "\n" not in message
    assert "Traceback" not in message
    assert message.strip()
    return message


# --- defaults and the example ----------------------------------------------------------------


def test_minimal_yaml_gets_the_documented_defaults(write: Write) -> None:
    cfg = load(write("symbols: [AAPL]\n"))

    assert cfg.symbols == ["AAPL"]
    assert cfg.finnhub.base_url == "https://finnhub.io/api/v1"
    assert cfg.finnhub.token_secret_id == "finnstream/finnhub"
    assert cfg.finnhub.token_secret_key == "token"
    assert cfg.finnhub.requests_per_minute == 60
    assert cfg.finnhub.requests_per_second == 30
    assert cfg.finnhub.timeout_s == 5
    assert cfg.finnhub.retries == 3
    assert cfg.schedule.cron == "* * * * *"
    assert cfg.schedule.market_hours_only is False
    assert cfg.kinesis.stream_name == "finnstream-quotes"
    assert cfg.kinesis.region is None
    assert cfg.kinesis.endpoint_url is None
    assert cfg.kinesis.max_retries == 8
    assert cfg.spool.dir == Path("/var/lib/finnstream/spool")
    assert cfg.spool.max_bytes == 268_435_456
    assert cfg.backfill.enabled is True
    assert cfg.backfill.every_minutes == 15
    assert cfg.backfill.max_attempts == 3
    assert (cfg.shard.index, cfg.shard.count) == (0, 1)
    assert (cfg.health.host, cfg.health.port) == ("0.0.0.0", 8080)
    assert (cfg.log.level, cfg.log.format) == ("INFO", "json")


def test_the_shipped_example_loads_and_equals_the_defaults() -> None:
    cfg = load(EXAMPLE)

    assert cfg.symbols == ["AAPL", "MSFT", "AMZN"]
    assert cfg == Config(symbols=["AAPL", "MSFT", "AMZN"])


def test_minute_capacity_of_the_free_plan_is_one_below_its_per_minute_limit() -> None:
    # 60 a minute would start each cycle 0.2 s (the minute guard) later than the one before
    assert minute_capacity(FinnhubConfig()) == 59
    assert minute_capacity(FinnhubConfig(requests_per_minute=300)) == 298
    # 1 request per second, paced with the guard, starts 55 within 56 s of the tick
    assert minute_capacity(FinnhubConfig(requests_per_second=1, requests_per_minute=100)) == 55


@pytest.mark.parametrize("ticker", ["BRK.B", "^GSPC", "BTC-USD", "BINANCE:BTCUSDT", "7203.T"])
def test_real_world_tickers_are_valid(write: Write, ticker: str) -> None:
    cfg = load(write(f"symbols: ['{ticker}', AAPL]\n"))

    assert cfg.symbols == [ticker, "AAPL"]


def test_config_path_lookup_order() -> None:
    assert resolve_path("a.yaml", {"FINNSTREAM_CONFIG": "b.yaml"}) == Path("a.yaml")
    assert resolve_path(None, {"FINNSTREAM_CONFIG": "b.yaml"}) == Path("b.yaml")
    assert resolve_path(None, {}) == Path("config/finnstream.yaml")


# --- environment overrides -------------------------------------------------------------------


def test_env_overrides_set_values_with_yaml_types(write: Write) -> None:
    path = write("symbols: [AAPL]\nkinesis: {region: eu-west-1}\n")

    cfg = load(
        path,
        FINNSTREAM_KINESIS__STREAM_NAME="prod-quotes",
        FINNSTREAM_FINNHUB__REQUESTS_PER_MINUTE="300",
        FINNSTREAM_SCHEDULE__MARKET_HOURS_ONLY="true",
        FINNSTREAM_KINESIS__REGION="null",
    )

    assert cfg.kinesis.stream_name == "prod-quotes"
    assert cfg.finnhub.requests_per_minute == 300
    assert type(cfg.finnhub.requests_per_minute) is int
    assert cfg.schedule.market_hours_only is True
    assert cfg.kinesis.region is None
    # the rest of the file is kept
    assert cfg.finnhub.requests_per_second == 30


def test_env_override_parses_scalars_like_the_file() -> None:
    assert env_overrides(
        {
            "FINNSTREAM_FINNHUB__REQUESTS_PER_MINUTE": "300",
            "FINNSTREAM_SCHEDULE__MARKET_HOURS_ONLY": "true",
            "FINNSTREAM_KINESIS__REGION": "null",
            "FINNSTREAM_KINESIS__STREAM_NAME": "prod-quotes",
            "FINNSTREAM_CONFIG": "ignored.yaml",
            "PATH": "/usr/bin",
            "HOME": "/root",
        }
    ) == {
        "finnhub": {"requests_per_minute": 300},
        "schedule": {"market_hours_only": True},
        "kinesis": {"region": None, "stream_name": "prod-quotes"},
    }


def test_env_symbols_replace_the_list(write: Write) -> None:
    cfg = load(write("symbols: [AMZN, TSLA, NVDA]\n"), FINNSTREAM_SYMBOLS="AAPL, MSFT,")

    assert cfg.symbols == ["AAPL", "MSFT"]


def test_empty_env_overrides_count_as_unset(write: Write) -> None:
    cfg = load(
        write("symbols: [AMZN]\nkinesis: {stream_name: from-file}\n"),
        FINNSTREAM_SYMBOLS="",
        FINNSTREAM_KINESIS__STREAM_NAME=" ",
    )

    assert cfg.symbols == ["AMZN"]
    assert cfg.kinesis.stream_name == "from-file"


def test_env_symbols_alone_satisfy_required_symbols(write: Write) -> None:
    cfg = load(write("log: {level: DEBUG}\n"), FINNSTREAM_SYMBOLS="BRK.B,^GSPC")

    assert cfg.symbols == ["BRK.B", "^GSPC"]
    assert cfg.log.level == "DEBUG"


def test_env_override_can_set_a_numeric_looking_string(write: Write) -> None:
    """`2024` is a valid stream name; the environment has no quotes to say it is a string."""
    cfg = load(write("symbols: [AAPL]\n"), FINNSTREAM_KINESIS__STREAM_NAME="2024")

    assert cfg.kinesis.stream_name == "2024"


def test_unknown_env_override_names_the_key(write: Write) -> None:
    message = config_error(write("symbols: [AAPL]\n"), FINNSTREAM_KINESIS__NOPE="1")

    assert "kinesis.nope" in message
    assert "unknown key" in message


@pytest.mark.parametrize("name", ["FINNSTREAM_FOO", "FINNSTREAM_A__B__C", "FINNSTREAM_KINESIS__"])
def test_malformed_env_override_name_is_named(write: Write, name: str) -> None:
    message = config_error(write("symbols: [AAPL]\n"), **{name: "1"})

    assert name in message
    assert "FINNSTREAM_<SECTION>__<KEY>" in message


def test_bad_env_override_value_names_the_field(write: Write) -> None:
    message = config_error(
        write("symbols: [AAPL]\n"), FINNSTREAM_FINNHUB__REQUESTS_PER_MINUTE="lots"
    )

    assert "finnhub.requests_per_minute" in message


# --- the file itself is wrong ----------------------------------------------------------------


def test_malformed_yaml_gives_the_line(write: Write) -> None:
    path = write("symbols: [AAPL]\nfinnhub:\n  timeout_s: 5\n    retries: [\n")

    message = config_error(path)

    assert "not valid YAML" in message
    assert "line 4" in message
    assert str(path) in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"

    message = config_error(path)

    assert str(path) in message
    assert "does not exist" in message


def test_yaml_that_is_a_list_is_rejected(write: Write) -> None:
    message = config_error(write("- AAPL\n- MSFT\n"))

    assert "mapping" in message
    assert "list" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("finnhub: {}\n", "symbols: is required"),
        ("", "symbols: is required"),
        ("symbols: []\n", "symbols:"),
        ("symbols: [AAPL, MSFT, AAPL]\n", "'AAPL' is listed twice"),
        ("symbols: ['AA PL']\n", "'AA PL'"),
        ("symbols: [' AAPL']\n", "' AAPL'"),
        ("symbols: ['']\n", "symbols:"),
        ("symbols: AAPL\n", "symbols:"),
    ],
)
def test_bad_symbols_are_named(write: Write, text: str, expected: str) -> None:
    message = config_error(write(text))

    assert "symbols" in message
    assert expected in message


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("finnhub", "requests_per_minute", 0),
        ("finnhub", "requests_per_minute", -5),
        ("finnhub", "requests_per_second", 0),
        ("finnhub", "requests_per_second", -1),
        ("finnhub", "timeout_s", 0),
        ("backfill", "every_minutes", 0),
    ],
)
def test_non_positive_rates_are_named(write: Write, section: str, key: str, value: int) -> None:
    message = config_error(write(f"symbols: [AAPL]\n{section}: {{{key}: {value}}}\n"))

    assert f"{section}.{key}" in message
    assert "greater than 0" in message


@pytest.mark.parametrize(
    ("cron", "hint"),
    [
        ("61 * * * *", "61"),
        ("* * *", "5"),
        ("* * * * * *", "5"),
        ("every minute", "cron"),
        ("* * 31 2 *", "never fires"),
    ],
)
def test_bad_cron_is_named(write: Write, cron: str, hint: str) -> None:
    message = config_error(write(f"symbols: [AAPL]\nschedule: {{cron: '{cron}'}}\n"))

    assert "schedule.cron" in message
    assert hint in message


def test_unknown_top_level_key_is_named(write: Write) -> None:
    message = config_error(write("symbols: [AAPL]\nkinesiss: {stream_name: x}\n"))

    assert "kinesiss" in message
    assert "unknown key" in message


def test_unknown_key_in_a_section_is_named_with_its_section(write: Write) -> None:
    message = config_error(write("symbols: [AAPL]\nkinesis: {stream_nam: prod}\n"))

    assert "kinesis.stream_nam" in message
    assert "unknown key" in message


def test_shard_index_must_be_below_count(write: Write) -> None:
    message = config_error(write("symbols: [AAPL]\nshard: {index: 2, count: 2}\n"))

    assert "shard" in message
    assert "index 2" in message


def test_bad_log_level_is_named(write: Write) -> None:
    message = config_error(write("symbols: [AAPL]\nlog: {level: LOUD}\n"))

    assert "log.level" in message


def test_log_level_is_case_insensitive(write: Write) -> None:
    assert load(write("symbols: [AAPL]\nlog: {level: debug}\n")).log.level == "DEBUG"


def test_bad_log_format_is_named(write: Write) -> None:
    message = config_error(write("symbols: [AAPL]\nlog: {format: xml}\n"))

    assert "log.format" in message


def test_base_url_must_be_http(write: Write) -> None:
    message = config_error(write("symbols: [AAPL]\nfinnhub: {base_url: 'ftp://x'}\n"))

    assert "finnhub.base_url" in message


def test_several_problems_are_all_named_on_one_line(write: Write) -> None:
    message = config_error(
        write("symbols: [AAPL]\nfinnhub: {requests_per_minute: 0}\nlog: {format: xml}\n")
    )

    assert "finnhub.requests_per_minute" in message
    assert "log.format" in message


def test_config_is_frozen(write: Write) -> None:
    cfg = load(write("symbols: [AAPL]\n"))

    with pytest.raises(ValueError, match="frozen"):
        cfg.kinesis.stream_name = "other"  # type: ignore[misc]
