"""Records as CONTRACT section 3 defines them: fields, types, the newline, and bad answers."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finnstream.records import (
    BadAnswer,
    NotAPrice,
    Record,
    candle_record,
    gap_record,
    is_unknown_symbol,
    quote_record,
)

MINUTE = 1_592_415_180  # 2020-06-17T17:33:00Z, a minute slot
FETCHED = 1_592_415_180.412
QUOTE = {
    "c": 351.73,
    "o": 349.31,
    "h": 352.0,
    "l": 348.9,
    "pc": 351.59,
    "d": 0.14,
    "dp": 0.0398,
    "t": 1_592_415_210,
}
CONTRACT_EXAMPLE = {
    "schema": 1,
    "symbol": "AAPL",
    "minute": 1592415180,
    "source": "quote",
    "price": 351.73,
    "open": 349.31,
    "high": 352.0,
    "low": 348.9,
    "previous_close": 351.59,
    "change": 0.14,
    "change_percent": 0.0398,
    "volume": None,
    "quote_time": 1592415210,
    "fetched_at": 1592415180.412,
}


def wire(record: Record) -> dict[str, Any]:
    """Decode `data` the way a consumer would, checking the wire format on the way."""
    assert record.data.endswith(b"\n")
    assert record.data.count(b"\n") == 1
    text = record.data.decode("utf-8")  # valid UTF-8 or this raises
    value: dict[str, Any] = json.loads(text)
    return value


# --- quote -----------------------------------------------------------------------------------


def test_quote_record_is_the_contract_example() -> None:
    record = quote_record("AAPL", MINUTE, QUOTE, FETCHED)

    assert wire(record) == CONTRACT_EXAMPLE
    assert record.decode() == CONTRACT_EXAMPLE
    assert (record.symbol, record.minute, record.source) == ("AAPL", MINUTE, "quote")
    assert record.key == ("AAPL", MINUTE, "quote")
    assert record.partition_key == "AAPL"


def test_quote_record_types_match_the_contract() -> None:
    body = wire(quote_record("AAPL", MINUTE, {**QUOTE, "c": 351, "t": 1_592_415_210.0}, FETCHED))

    assert type(body["schema"]) is int
    assert type(body["minute"]) is int
    assert type(body["quote_time"]) is int
    assert type(body["price"]) is float
    assert type(body["fetched_at"]) is float
    assert body["volume"] is None
    assert "reason" not in body


def test_minute_is_the_argument_never_finnhubs_t() -> None:
    late = {**QUOTE, "t": MINUTE + 95}  # Finnhub's own time is in the next minute

    body = wire(quote_record("AAPL", MINUTE, late, MINUTE + 61.5))

    assert body["minute"] == MINUTE
    assert body["quote_time"] == MINUTE + 95


def test_null_change_is_kept_as_null() -> None:
    body = wire(quote_record("AAPL", MINUTE, {**QUOTE, "d": None, "dp": None}, FETCHED))

    assert body["change"] is None
    assert body["change_percent"] is None
    assert body["price"] == 351.73


def test_missing_optional_fields_become_null() -> None:
    body = wire(quote_record("AAPL", MINUTE, {"c": 10.5}, FETCHED))

    for field in ("open", "high", "low", "previous_close", "change", "change_percent"):
        assert body[field] is None, field
    assert body["quote_time"] is None
    assert body["price"] == 10.5


@pytest.mark.parametrize(
    "body",
    [
        {k: v for k, v in QUOTE.items() if k != "c"},
        {**QUOTE, "c": None},
        {**QUOTE, "c": "351.73"},
        {**QUOTE, "c": math.nan},
        {**QUOTE, "c": math.inf},
        {**QUOTE, "c": True},
        {**QUOTE, "h": "high"},
        {**QUOTE, "dp": math.nan},
    ],
    ids=["c-missing", "c-none", "c-str", "c-nan", "c-inf", "c-bool", "h-str", "dp-nan"],
)
def test_malformed_quote_raises_bad_answer(body: dict[str, Any]) -> None:
    with pytest.raises(BadAnswer):
        quote_record("AAPL", MINUTE, body, FETCHED)


@pytest.mark.parametrize("body", [None, [], [QUOTE], "error", 42])
def test_non_object_answer_raises_bad_answer(body: Any) -> None:
    with pytest.raises(BadAnswer, match="not an object"):
        quote_record("AAPL", MINUTE, body, FETCHED)


def test_bad_answer_is_a_value_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match="'c'"):
        quote_record("AAPL", MINUTE, {**QUOTE, "c": "x"}, FETCHED)


# --- unknown symbols -------------------------------------------------------------------------


def test_finnhubs_unknown_symbol_answer_is_recognised() -> None:
    unknown = {"c": 0, "d": None, "dp": None, "h": 0, "l": 0, "o": 0, "pc": 0, "t": 0}

    assert is_unknown_symbol(unknown)
    assert is_unknown_symbol({"c": 0.0, "t": 0})


@pytest.mark.parametrize(
    "body",
    [QUOTE, {**QUOTE, "c": 0}, {**QUOTE, "t": 0}, {}, {"c": None, "t": None}],
)
def test_real_quotes_are_not_unknown(body: dict[str, Any]) -> None:
    assert not is_unknown_symbol(body)


@pytest.mark.parametrize(
    "body",
    [
        {**QUOTE, "c": -0.01},
        {**QUOTE, "c": -351.73, "t": 0},
        {**QUOTE, "c": 0, "t": 1_592_415_210},
        {**QUOTE, "c": 0.0, "t": None},
        {"c": 0},
    ],
    ids=["negative", "negative-t0", "zero-with-t", "zero-t-null", "zero-alone"],
)
def test_a_price_that_is_not_positive_is_not_a_price(body: dict[str, Any]) -> None:
    assert not is_unknown_symbol(body)
    with pytest.raises(NotAPrice, match="not a price"):
        quote_record("AAPL", MINUTE, body, FETCHED)


def test_not_a_price_is_a_bad_answer_the_cycle_can_tell_apart() -> None:
    assert issubclass(NotAPrice, BadAnswer)
    with pytest.raises(BadAnswer) as info:
        quote_record("AAPL", MINUTE, {**QUOTE, "c": "x"}, FETCHED)
    assert not isinstance(info.value, NotAPrice)  # malformed is not "not a price"
    with pytest.raises(BadAnswer) as info:
        quote_record("AAPL", MINUTE, {**QUOTE, "c": -1.0, "h": "x"}, FETCHED)
    assert not isinstance(info.value, NotAPrice)  # checked only once the answer is well-formed


@pytest.mark.parametrize("close", [0, 0.0, -1.5])
def test_a_candle_whose_close_is_not_positive_is_not_a_price(close: float) -> None:
    with pytest.raises(NotAPrice):
        candle_record("MSFT", MINUTE, {"o": 1.0, "c": close, "v": 1, "t": MINUTE}, FETCHED)


@pytest.mark.parametrize("body", [{"c": False, "t": False}, {"c": 0, "t": False}, "zero"])
def test_only_numeric_zeros_are_the_unknown_symbol_answer(body: Any) -> None:
    assert not is_unknown_symbol(body)


# --- candle and gap --------------------------------------------------------------------------


def test_candle_record_maps_the_bar() -> None:
    bar = {"o": 10.0, "h": 12.5, "l": 9.5, "c": 11.25, "v": 12345, "t": MINUTE}

    body = wire(candle_record("MSFT", MINUTE, bar, FETCHED))

    assert body == {
        "schema": 1,
        "symbol": "MSFT",
        "minute": MINUTE,
        "source": "candle",
        "price": 11.25,
        "open": 10.0,
        "high": 12.5,
        "low": 9.5,
        "previous_close": None,
        "change": None,
        "change_percent": None,
        "volume": 12345,
        "quote_time": MINUTE,
        "fetched_at": FETCHED,
    }
    assert type(body["volume"]) is int


def test_candle_volume_given_as_float_is_an_int() -> None:
    bar = {"o": 1, "h": 1, "l": 1, "c": 1, "v": 500.0, "t": MINUTE}

    body = wire(candle_record("MSFT", MINUTE, bar, FETCHED))

    assert body["volume"] == 500
    assert type(body["volume"]) is int


def test_candle_without_close_raises_bad_answer() -> None:
    with pytest.raises(BadAnswer):
        candle_record("MSFT", MINUTE, {"o": 1.0, "v": 1, "t": MINUTE}, FETCHED)


def test_gap_record_has_a_reason_and_null_prices() -> None:
    record = gap_record("AMZN", MINUTE, "candles: 403 (free plan)", FETCHED)

    body = wire(record)

    assert record.key == ("AMZN", MINUTE, "gap")
    assert body["source"] == "gap"
    assert body["reason"] == "candles: 403 (free plan)"
    assert body["minute"] == MINUTE
    assert body["fetched_at"] == FETCHED
    for field in (
        "price",
        "open",
        "high",
        "low",
        "previous_close",
        "change",
        "change_percent",
        "volume",
        "quote_time",
    ):
        assert body[field] is None, field


@pytest.mark.parametrize(
    "symbol",
    ["BRK.B", "^GSPC", "BTC-USD", "BINANCE:BTCUSDT", 'QU"OTE', "back\\slash", "Zürich", "株式"],
)
def test_odd_symbols_round_trip(symbol: str) -> None:
    for record in (
        quote_record(symbol, MINUTE, QUOTE, FETCHED),
        candle_record(symbol, MINUTE, {"c": 1.0, "v": 1, "t": MINUTE}, FETCHED),
        gap_record(symbol, MINUTE, "no candle for «this» minute", FETCHED),
    ):
        assert wire(record)["symbol"] == symbol
        assert record.partition_key == symbol


def test_fetched_at_is_kept_to_the_millisecond() -> None:
    body = wire(quote_record("AAPL", MINUTE, QUOTE, MINUTE + 0.41249999))

    assert body["fetched_at"] == pytest.approx(MINUTE + 0.412, abs=1e-6)


# --- any JSON-decoded answer: a record orjson round-trips, or BadAnswer -----------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62, max_value=2**66)  # around orjson's and int64's edges
    | st.floats()  # nan and the infinities too
    | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)
ANSWER_KEYS = st.sampled_from(["c", "o", "h", "l", "pc", "d", "dp", "t", "v"]) | st.text(max_size=3)
FINNHUB_LIKE = st.fixed_dictionaries(
    {"c": st.floats(min_value=0.01, max_value=1e6)}, optional={"t": JSON_SCALARS}
) | st.dictionaries(ANSWER_KEYS, JSON_VALUES, max_size=9)


@settings(max_examples=400, database=None)
@given(body=FINNHUB_LIKE | JSON_VALUES)
def test_any_json_answer_becomes_a_round_trippable_record_or_bad_answer(body: Any) -> None:
    for build in (quote_record, candle_record):
        try:
            record = build("AAPL", MINUTE, body, FETCHED)
        except BadAnswer:
            continue
        decoded = orjson.loads(record.data)
        assert orjson.dumps(decoded) + b"\n" == record.data
        for field in ("quote_time", "volume"):
            assert decoded[field] is None or type(decoded[field]) is int


@pytest.mark.parametrize(
    "bar",
    [
        {"c": 1.0, "t": 10**20},
        {"c": 1.0, "t": 1e20},
        {"c": 1.0, "t": -(2**63) - 1},
        {"c": 10**400},
        {"c": 1.0, "o": 10**400},
        {"c": {"value": 1.0}},
        {"c": 1.0, "h": [2.0]},
    ],
    ids=["t-1e20", "t-float-1e20", "t-below-int64", "c-huge", "o-huge", "c-object", "h-list"],
)
def test_numbers_out_of_range_or_nested_are_bad_answers(bar: dict[str, Any]) -> None:
    with pytest.raises(BadAnswer):
        quote_record("AAPL", MINUTE, bar, FETCHED)
    with pytest.raises(BadAnswer):
        candle_record("AAPL", MINUTE, bar, FETCHED)


@pytest.mark.parametrize("volume", [10**20, 1e20, 2**63, math.inf, [1]])
def test_a_candle_volume_out_of_range_or_nested_is_a_bad_answer(volume: Any) -> None:
    with pytest.raises(BadAnswer, match="'v'"):
        candle_record("AAPL", MINUTE, {"c": 1.0, "v": volume, "t": MINUTE}, FETCHED)


def test_the_largest_int64_volume_is_kept() -> None:
    body = wire(candle_record("MSFT", MINUTE, {"c": 1.0, "v": 2**63 - 1, "t": MINUTE}, FETCHED))

    assert body["volume"] == 2**63 - 1


@pytest.mark.parametrize("bar", [None, [], "bar", 3])
def test_a_bar_that_is_not_an_object_is_a_bad_answer(bar: Any) -> None:
    with pytest.raises(BadAnswer, match="not an object"):
        candle_record("AAPL", MINUTE, bar, FETCHED)
