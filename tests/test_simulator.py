"""The Finnhub simulator over real HTTP: auth, bodies, limits, candles, failures, observability."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import structlog

from finnstream.clock import FakeClock, minute_slot
from finnstream.simulator import (
    Simulator,
    SimulatorSettings,
    candle_for,
    quote_for,
    serve,
)

TOKEN = {"X-Finnhub-Token": "sim-token"}
LIMIT_BODY = '{"error":"API limit reached. Please try again later. Remaining Limit: 0"}'
START = 1_700_000_000.0  # FakeClock's default wall start: Tue 2023-11-14 22:13:20 UTC


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def simulator(clock: FakeClock, **settings: Any) -> Simulator:
    return Simulator(SimulatorSettings(**settings), clock=clock.time, monotonic=clock.monotonic)


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = TOKEN, /, **params: str
) -> tuple[int, str, Any]:
    """GET `url`: (status, raw text, JSON body or None)."""
    async with http.get(url, params=params, headers=headers) as resp:
        text = await resp.text()
        body = (
            await resp.json(content_type=None) if resp.content_type == "application/json" else None
        )
        return resp.status, text, body


async def test_header_token_answers_the_quote_of_the_minute(
    clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    async with simulator(clock) as sim:
        status, _, body = await get(http, f"{sim.url}/quote", symbol="AAPL")
    assert status == 200
    assert body == quote_for("AAPL", minute_slot(START))
    assert sim.stats.token_in_url == 0
    assert sim.stats.quote_requests == {"AAPL": 1}
    assert sim.stats.by_status == {200: 1}


async def test_auth_failures_and_token_in_url(
    clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    async with simulator(clock) as sim:
        url = f"{sim.url}/quote"
        assert (await get(http, url, None, symbol="AAPL"))[:2] == (
            401,
            '{"error":"Please use an API key."}',
        )
        bad = {"X-Finnhub-Token": "wrong"}
        assert (await get(http, url, bad, symbol="AAPL"))[:2] == (
            401,
            '{"error":"Invalid API key"}',
        )
        assert (await get(http, url, None, symbol="AAPL", token="sim-token"))[0] == 200
        assert sim.stats.token_in_url == 1
        # A rotation: the old token stops working, the new one starts.
        sim.settings.tokens = frozenset({"rotated"})
        assert (await get(http, url, symbol="AAPL"))[0] == 401
        assert (await get(http, url, {"X-Finnhub-Token": "rotated"}, symbol="AAPL"))[0] == 200
        sim.settings.tokens = None
        assert (await get(http, url, {"X-Finnhub-Token": "anything"}, symbol="AAPL"))[0] == 200
        assert (await get(http, url, {"X-Finnhub-Token": ""}, symbol="AAPL"))[0] == 401
    assert sim.stats.by_status == {401: 4, 200: 3}


async def test_unknown_symbol_is_200_with_zeros(
    clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    async with simulator(clock) as sim:
        status, text, _ = await get(http, f"{sim.url}/quote", symbol="ZZZZ")
    assert status == 200
    assert text == '{"c":0,"d":null,"dp":null,"h":0,"l":0,"o":0,"pc":0,"t":0}'


@pytest.mark.parametrize("ticker", ["BRK.B", "^GSPC", "BTC-USD"])
async def test_odd_tickers_arrive_decoded(
    ticker: str, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    async with simulator(clock) as sim:
        status, _, body = await get(http, f"{sim.url}/quote", symbol=ticker)
    assert (status, body) == (200, quote_for(ticker, minute_slot(START)))
    assert sim.stats.quote_requests == {ticker: 1}


async def test_per_second_limit_slides_and_ignores_rejections(
    clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    async with simulator(clock, requests_per_second=3) as sim:
        url = f"{sim.url}/quote"
        assert [(await get(http, url, symbol="AAPL"))[0] for _ in range(3)] == [200] * 3
        status, text, _ = await get(http, url, symbol="AAPL")
        assert (status, text) == (429, LIMIT_BODY)
        clock.advance(0.999)  # still inside (t-1, t]
        assert (await get(http, url, symbol="AAPL"))[0] == 429
        clock.advance(0.001)  # the three from t=0 leave; the rejected ones never counted
        statuses = [(await get(http, url, symbol="MSFT"))[0] for _ in range(4)]
        # Candles and market status share the window.
        assert (await get(http, f"{sim.url}/stock/market-status", exchange="US"))[0] == 429
    assert statuses == [200, 200, 200, 429]
    assert sim.stats.rate_limited == 4
    assert sim.stats.arrivals == [0.0] * 4 + [0.999] + [1.0] * 5


async def test_per_minute_limit_and_headers(clock: FakeClock, http: aiohttp.ClientSession) -> None:
    async with simulator(clock, requests_per_minute=3) as sim:
        url = f"{sim.url}/quote"
        remaining = []
        for step in range(3):
            async with http.get(url, params={"symbol": "AAPL"}, headers=TOKEN) as resp:
                assert resp.status == 200
                assert resp.headers["X-Ratelimit-Limit"] == "3"
                assert resp.headers["X-Ratelimit-Reset"] == str(int(START) + 60)
                remaining.append(resp.headers["X-Ratelimit-Remaining"])
            if step == 0:
                clock.advance(10)
        assert remaining == ["2", "1", "0"]
        clock.advance(49.999)
        candle = {"symbol": "AAPL", "resolution": "1", "from": "0", "to": "0"}
        async with http.get(f"{sim.url}/stock/candle", params=candle, headers=TOKEN) as resp:
            assert (resp.status, await resp.text()) == (429, LIMIT_BODY)
            assert resp.headers["X-Ratelimit-Remaining"] == "0"
        clock.advance(0.001)  # the first request leaves the minute window
        assert (await get(http, url, symbol="AAPL"))[0] == 200
        assert (await get(http, url, symbol="AAPL"))[0] == 429


async def test_candles_premium_free_and_no_data(
    clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    m = minute_slot(START)
    async with simulator(clock, premium=False, no_candle_symbols=frozenset({"NOPE"})) as sim:
        url = f"{sim.url}/stock/candle"

        async def candle(symbol: str, first: int, last: int, resolution: str = "1") -> Any:
            return await get(
                http,
                url,
                symbol=symbol,
                resolution=resolution,
                **{"from": str(first), "to": str(last)},
            )

        assert (await candle("AAPL", m, m + 120))[:2] == (
            403,
            '{"error":"You don\'t have access to this resource."}',
        )
        sim.settings.premium = True
        status, _, body = await candle("AAPL", m - 59, m + 120)
        assert (await candle("NOPE", m, m + 120))[2] == {"s": "no_data"}
        assert (await candle("ZZZZ", m, m + 120))[2] == {"s": "no_data"}
        assert (await candle("AAPL", m + 1, m + 59))[2] == {"s": "no_data"}
        assert (await candle("AAPL", m, m, resolution="5"))[0] == 422
    bars = [candle_for("AAPL", t) for t in (m, m + 60, m + 120)]
    assert status == 200
    assert body == {"s": "ok"} | {
        k: [bar[k] for bar in bars] for k in ("t", "o", "h", "l", "c", "v")
    }
    assert sim.stats.candle_requests == 6


async def test_fail_and_error_rate(clock: FakeClock, http: aiohttp.ClientSession) -> None:
    async with simulator(clock, seed=7) as sim:
        url = f"{sim.url}/quote"
        assert (await get(http, url, symbol="AAPL"))[0] == 200
        sim.settings.fail_symbols = frozenset({"AAPL"})  # mid-run
        assert (await get(http, url, symbol="AAPL"))[0] == 500
        assert (await get(http, url, symbol="MSFT"))[0] == 200
        sim.settings.error_rate = 1.0
        statuses = [(await get(http, url, symbol="MSFT"))[0] for _ in range(20)]
        sim.settings.error_rate = 0.0
        assert (await get(http, url, symbol="MSFT"))[0] == 200
    assert set(statuses) == {500, 502}
    assert [s for s, _, _ in sim.stats.served] == ["AAPL", "MSFT", "MSFT"]


async def test_hang_until_client_gives_up_then_stop_is_clean(
    clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    async with simulator(clock, hang_symbols=frozenset({"SLOW"})) as sim:
        url = f"{sim.url}/quote"
        with pytest.raises(asyncio.TimeoutError):
            async with http.get(
                url, params={"symbol": "SLOW"}, headers=TOKEN, timeout=aiohttp.ClientTimeout(0.2)
            ):
                pass
        assert (await get(http, url, symbol="AAPL"))[0] == 200
        # A client that never gives up gets an answer when the server stops.
        waiting = asyncio.create_task(get(http, url, symbol="SLOW"))
        while sim.stats.quote_requests["SLOW"] < 2:  # noqa: ASYNC110 - no event to await
            await asyncio.sleep(0.01)
        began = time.monotonic()
        await sim.stop()
    assert time.monotonic() - began < 0.5
    assert (await waiting)[0] == 503


async def test_market_status(http: aiohttp.ClientSession) -> None:
    wednesday_10am_ny = datetime(2024, 1, 3, 15, 0, tzinfo=UTC).timestamp()
    clock = FakeClock(start=wednesday_10am_ny)
    async with simulator(clock) as sim:
        _, _, open_ = await get(http, f"{sim.url}/stock/market-status", exchange="US")
        clock.advance(3 * 86_400)  # Saturday
        _, _, closed = await get(http, f"{sim.url}/stock/market-status", exchange="US")
    assert open_ == {
        "exchange": "US",
        "holiday": None,
        "isOpen": True,
        "session": "regular",
        "t": int(wednesday_10am_ny),
        "timezone": "America/New_York",
    }
    assert (closed["isOpen"], closed["session"]) == (False, "closed")


async def test_served_log_uses_the_simulator_minute(
    clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    m = minute_slot(START)
    async with simulator(clock) as sim:
        await get(http, f"{sim.url}/quote", symbol="AAPL")
        clock.advance(60)
        await get(http, f"{sim.url}/quote", symbol="AAPL")
        await get(http, f"{sim.url}/quote", symbol="UNKNOWN")
        served = sim.stats.served
        sim.reset_stats()
        assert sim.stats.requests == 0
    assert served[:2] == [
        ("AAPL", m, quote_for("AAPL", m)),
        ("AAPL", m + 60, quote_for("AAPL", m + 60)),
    ]
    assert served[2][:2] == ("UNKNOWN", m + 60)
    assert served[0][2] != served[1][2]


async def test_serve_logs_its_url_and_stops_on_the_event(http: aiohttp.ClientSession) -> None:
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(serve(SimulatorSettings(), "127.0.0.1", 0, stop))
        while not logs:  # noqa: ASYNC110 - the log line is the only signal serve() gives
            await asyncio.sleep(0.01)
    assert logs[0]["event"] == "simulator.listening"
    status, _, body = await get(http, f"{logs[0]['url']}/stock/market-status", exchange="US")
    stop.set()
    await asyncio.wait_for(task, 2)
    assert status == 200
    assert body["timezone"] == "America/New_York"


@pytest.mark.parametrize("symbol", ["AAPL", "MSFT", "BRK.B", "^GSPC", "BTC-USD", "X"])
def test_prices_are_plausible_and_consistent(symbol: str) -> None:
    first = minute_slot(START) - 86_400
    for minute in range(first, first + 2 * 86_400, 7 * 60):
        q = quote_for(symbol, minute)
        assert q == quote_for(symbol, minute + 59)
        assert q["t"] == minute - minute % 86_400 + 13 * 3600 + 1800
        assert q["l"] <= min(q["o"], q["c"]) <= max(q["o"], q["c"]) <= q["h"]
        assert q["d"] == round(q["c"] - q["pc"], 2)
        assert q["dp"] == pytest.approx((q["c"] - q["pc"]) / q["pc"] * 100, abs=1e-4)
        assert 1 < q["c"] < 1000
        bar = candle_for(symbol, minute)
        assert bar["t"] == minute and isinstance(bar["v"], int) and bar["v"] > 0
        assert bar["l"] <= min(bar["o"], bar["c"]) <= max(bar["o"], bar["c"]) <= bar["h"]
        assert bar["o"] == q["c"]
        for key in ("c", "d", "h", "l", "o", "pc"):
            assert round(q[key], 2) == q[key]
        for key in ("o", "h", "l", "c"):
            assert round(bar[key], 2) == bar[key]
