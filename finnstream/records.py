"""Normalize Finnhub answers into contract records (CONTRACT section 3) and encode them once.

A `Record` carries its identity (symbol, minute, source) and its encoded `data`: one UTF-8 JSON
object plus a newline, ready for Kinesis and for the spool. Nothing downstream re-encodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

SCHEMA_VERSION = 1
SOURCE_QUOTE = "quote"
SOURCE_CANDLE = "candle"
SOURCE_GAP = "gap"


@dataclass(frozen=True, slots=True)
class Record:
    symbol: str
    minute: int
    source: str
    data: bytes

    @property
    def partition_key(self) -> str:
        return self.symbol

    @property
    def key(self) -> tuple[str, int, str]:
        """(symbol, minute, source): what consumers deduplicate on."""
        return (self.symbol, self.minute, self.source)

    def decode(self) -> dict[str, Any]:
        value: dict[str, Any] = orjson.loads(self.data)
        return value


class BadAnswer(ValueError):
    """A Finnhub answer that cannot become a record (wrong shape, types or range)."""


# An integer field (`quote_time`, `volume`) must fit a signed 64-bit integer: what orjson encodes
# (it stops at 2**64 - 1) and what a consumer's bigint (Athena, Glue) holds.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadAnswer(f"answer is {type(body).__name__}, not an object")
    return body


def _number(body: dict[str, Any], key: str, *, required: bool) -> int | float | None:
    """The JSON number at `key` as decoded (an int stays an int), or None when null/absent."""
    value = body.get(key)
    if value is None:
        if required:
            raise BadAnswer(f"field {key!r} is missing or null")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadAnswer(f"field {key!r} is {type(value).__name__}, not a number")
    return value


def _num(body: dict[str, Any], key: str, *, required: bool = False) -> float | None:
    value = _number(body, key, required=required)
    if value is None:
        return None
    try:
        number = float(value)  # an int beyond a double's range overflows here
    except OverflowError:
        raise BadAnswer(f"field {key!r} is out of range") from None
    if not math.isfinite(number):
        raise BadAnswer(f"field {key!r} is not finite")
    return number


def _int(body: dict[str, Any], key: str) -> int | None:
    value = _number(body, key, required=False)
    if value is None:
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadAnswer(f"field {key!r} is not finite")
        value = int(value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise BadAnswer(f"field {key!r} is out of range for a 64-bit integer")
    return value


class NotAPrice(BadAnswer):
    """A well-formed answer whose price is not a price, so it is not published.

    A quote with `c < 0`, or `c == 0` with `t != 0` (`c == 0` and `t == 0` is Finnhub's answer
    for an unknown symbol: `is_unknown_symbol`, checked first); a candle bar whose close is not
    positive. Distinct from a malformed answer, so the cycle can count it apart.
    """


def _is_zero(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value == 0


def is_unknown_symbol(body: dict[str, Any]) -> bool:
    """Finnhub answers an unknown symbol with 200 and c == 0, t == 0."""
    return isinstance(body, dict) and _is_zero(body.get("c")) and _is_zero(body.get("t"))


def _prices(body: dict[str, Any]) -> dict[str, float | None]:
    """price, open, high, low from c, o, h, l: a quote's and a candle's alike."""
    return {
        "price": _num(body, "c", required=True),
        "open": _num(body, "o"),
        "high": _num(body, "h"),
        "low": _num(body, "l"),
    }


def _checked_price(fields: dict[str, Any], source: str) -> dict[str, Any]:
    """`fields`, once they are all well-formed and the price is positive; else `NotAPrice`."""
    price = fields["price"]
    if price <= 0:
        raise NotAPrice(f"{source} price {price} is not positive: not a price")
    return fields


_FIELDS = (
    "price",
    "open",
    "high",
    "low",
    "previous_close",
    "change",
    "change_percent",
    "volume",
    "quote_time",
    "fetched_at",
)


def _record(symbol: str, minute: int, source: str, fetched_at: float, **fields: Any) -> Record:
    """The contract's object, fields in contract order (absent ones null), encoded once."""
    obj: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "symbol": symbol,
        "minute": minute,
        "source": source,
    }
    obj.update(dict.fromkeys(_FIELDS))
    obj.update(fields, fetched_at=round(fetched_at, 3))
    return Record(symbol, minute, source, orjson.dumps(obj) + b"\n")


def quote_record(symbol: str, minute: int, body: Any, fetched_at: float) -> Record:
    """A `quote` record from a /quote answer.

    Raises `BadAnswer` for a malformed body, and its subclass `NotAPrice` for a price that is not
    positive (call `is_unknown_symbol` first: Finnhub's unknown-symbol answer has c == 0 too).
    """
    body = _object(body)
    fields = {
        **_prices(body),
        "previous_close": _num(body, "pc"),
        "change": _num(body, "d"),
        "change_percent": _num(body, "dp"),
        "quote_time": _int(body, "t"),
    }
    return _record(symbol, minute, SOURCE_QUOTE, fetched_at, **_checked_price(fields, "quote"))


def candle_record(symbol: str, minute: int, bar: Any, fetched_at: float) -> Record:
    """A `candle` record from one bar {o,h,l,c,v,t} of a /stock/candle answer.

    Raises `BadAnswer` for a malformed bar, and `NotAPrice` for a close that is not positive.
    """
    bar = _object(bar)
    fields = {
        **_prices(bar),
        "volume": _int(bar, "v"),
        "quote_time": _int(bar, "t"),
    }
    return _record(symbol, minute, SOURCE_CANDLE, fetched_at, **_checked_price(fields, "candle"))


def gap_record(symbol: str, minute: int, reason: str, fetched_at: float) -> Record:
    """A `gap` record: the slot could not be filled, and `reason` says why."""
    return _record(symbol, minute, SOURCE_GAP, fetched_at, reason=reason)
