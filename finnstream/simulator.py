"""A Finnhub stand-in: the REST endpoints finnstream uses, with Finnhub's auth, limits and bodies.

Tests, the demo and `finnstream simulate` talk to it over real HTTP. Prices are pure functions
of (symbol, minute) (`quote_for`, `candle_for`), so a test can compute what should have landed.
Everything that depends on time asks the injected `clock` (wall) or `monotonic` (rate windows,
arrivals), and `sim.settings` is read on every request, so a test can change it mid-run.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from datetime import time as daytime
from types import TracebackType
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from finnstream.clock import minute_slot

try:
    import structlog
except ImportError:  # pragma: no cover - structlog is a dependency; the simulator stands alone
    structlog = None  # type: ignore[assignment]

Json = dict[str, Any]

API_PREFIX = "/api/v1"
QUOTE_PATH = f"{API_PREFIX}/quote"
CANDLE_PATH = f"{API_PREFIX}/stock/candle"
MARKET_STATUS_PATH = f"{API_PREFIX}/stock/market-status"
TOKEN_HEADER = "X-Finnhub-Token"

MISSING_KEY: Json = {"error": "Please use an API key."}
INVALID_KEY: Json = {"error": "Invalid API key"}
LIMIT_REACHED: Json = {"error": "API limit reached. Please try again later. Remaining Limit: 0"}
NO_ACCESS: Json = {"error": "You don't have access to this resource."}
SERVER_ERROR: Json = {"error": "Internal Server Error"}
BAD_GATEWAY_HTML = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
UNKNOWN_QUOTE: Json = {"c": 0, "d": None, "dp": None, "h": 0, "l": 0, "o": 0, "pc": 0, "t": 0}

DAY_S = 86_400
SESSION_OPEN_UTC_S = 13 * 3600 + 30 * 60  # Finnhub's daily bar time: the day's 13:30 UTC
NEW_YORK = ZoneInfo("America/New_York")
REGULAR_OPEN, REGULAR_CLOSE = daytime(9, 30), daytime(16, 0)
SHUTDOWN_TIMEOUT_S = 1.0


@dataclass
class SimulatorSettings:
    """How the simulator behaves; read on every request, so tests may change it mid-run."""

    tokens: frozenset[str] | None = frozenset({"sim-token"})  # None: accept any non-empty token
    requests_per_minute: int | None = None
    requests_per_second: int | None = None
    latency_s: float = 0.0  # added to every answer
    error_rate: float = 0.0  # share of answers that are 500 / 502 (seeded RNG)
    premium: bool = True  # False: /stock/candle answers 403
    unknown_symbols: frozenset[str] = frozenset({"ZZZZ", "UNKNOWN"})
    fail_symbols: frozenset[str] = frozenset()  # always 500 for these
    fail_quote_symbols: frozenset[str] = frozenset()  # 500 on /quote only (candles still answer)
    hang_symbols: frozenset[str] = frozenset()  # never answer (until the client gives up)
    no_candle_symbols: frozenset[str] = frozenset()
    seed: int = 0


@dataclass
class SimulatorStats:
    """What the simulator saw, for tests to assert on."""

    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    rate_limited: int = 0
    token_in_url: int = 0
    quote_requests: Counter[str] = field(default_factory=Counter)  # every /quote, any answer
    candle_requests: int = 0
    arrivals: list[float] = field(default_factory=list)  # monotonic arrival of every request
    served: list[tuple[str, int, Json]] = field(default_factory=list)  # (symbol, minute, body)


# -- prices: pure functions of (symbol, minute) ---------------------------------------------


def _unit(*parts: object) -> float:
    """A stable number in [0, 1) for `parts` (crc32: the same in every process and run)."""
    return zlib.crc32("|".join(str(p) for p in parts).encode()) / 2**32


def _day_open(symbol: str, day: int) -> tuple[float, float]:
    """(open, previous close) of `symbol` on the UTC day starting at `day`."""
    base = 10.0 + 490.0 * _unit(symbol)
    previous_close = round(base * (0.96 + 0.08 * _unit(symbol, "close", day - DAY_S)), 2)
    return round(previous_close * (0.99 + 0.02 * _unit(symbol, "open", day)), 2), previous_close


def _price(symbol: str, minute: int) -> float:
    """The last price at the start of `minute`: a slow daily wave around the open, plus noise."""
    day = minute - minute % DAY_S
    open_, _ = _day_open(symbol, day)
    wave = math.sin(2 * math.pi * (_unit(symbol, "phase") + (minute - day) / 23_400))
    return round(open_ * (1 + 0.01 * wave + 0.002 * (_unit(symbol, minute) - 0.5)), 2)


def _spread(low: float, high: float, widen: float) -> tuple[float, float]:
    """(low, high) pushed apart by the share `widen`, rounded, never inside [low, high]."""
    return min(round(low * (1 - widen), 2), low), max(round(high * (1 + widen), 2), high)


def quote_for(symbol: str, minute: int) -> Json:
    """The exact /quote body served for a known `symbol` during `minute`."""
    minute = minute_slot(minute)
    day = minute - minute % DAY_S
    open_, previous_close = _day_open(symbol, day)
    last = _price(symbol, minute)
    # Prices stay within 1.1 % of the open, so the day's range is one per day and holds them all.
    low, high = _spread(open_, open_, 0.012 + 0.004 * _unit(symbol, day))
    low, high = min(low, last), max(high, last)
    return {
        "c": last,
        "d": round(last - previous_close, 2),
        "dp": round((last - previous_close) / previous_close * 100, 4),
        "h": high,
        "l": low,
        "o": open_,
        "pc": previous_close,
        "t": day + SESSION_OPEN_UTC_S,
    }


def candle_for(symbol: str, minute: int) -> Json:
    """The 1-minute bar starting at `minute`: opens at that minute's quote, closes at the next."""
    minute = minute_slot(minute)
    open_, close = _price(symbol, minute), _price(symbol, minute + 60)
    widen = 0.001 * _unit(symbol, "range", minute)
    low, high = _spread(min(open_, close), max(open_, close), widen)
    volume = 100 + int(20_000 * _unit(symbol, "volume", minute))
    return {"t": minute, "o": open_, "h": high, "l": low, "c": close, "v": volume}


def _json(status: int, body: Json, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


# -- the server -----------------------------------------------------------------------------


class _Window:
    """One token's arrivals in the last second and the last minute (admitted requests only)."""

    __slots__ = ("minute", "second")

    def __init__(self) -> None:
        self.second: deque[float] = deque()
        self.minute: deque[float] = deque()


class Simulator:
    """`async with Simulator(settings) as sim:` serves Finnhub's API at `sim.url`."""

    def __init__(
        self,
        settings: SimulatorSettings | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings if settings is not None else SimulatorSettings()
        self.stats = SimulatorStats()
        self._served_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.host, self.port = host, port
        self._clock, self._monotonic = clock, monotonic
        self._rng = random.Random(self.settings.seed)
        self._windows: dict[str, _Window] = {}
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    @property
    def url(self) -> str:
        if self._runner is None:
            raise RuntimeError("the simulator is not running: use `async with` or start()")
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}{API_PREFIX}"

    def reset_stats(self) -> None:
        self.stats = SimulatorStats()

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application(middlewares=[self._make_guard()])
        app.router.add_get(QUOTE_PATH, self._quote)
        app.router.add_get(CANDLE_PATH, self._candle)
        app.router.add_get(MARKET_STATUS_PATH, self._market_status)
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._closing.clear()
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Idempotent: answer the hanging requests, close connections, free the port."""
        runner, self._runner = self._runner, None
        if runner is not None:
            self._closing.set()
            await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _make_guard(self) -> Middleware:
        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self._guard(request, handler)

        return guard

    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """What every endpoint shares: stats, auth, rate limits, injected latency and errors."""
        now, stats, settings = self._monotonic(), self.stats, self.settings
        stats.requests += 1
        stats.arrivals.append(now)
        if request.path == QUOTE_PATH:
            stats.quote_requests[request.query.get("symbol", "")] += 1
        elif request.path == CANDLE_PATH:
            stats.candle_requests += 1
        try:
            response = await self._admitted(request, handler, now, settings)
        except web.HTTPException as exc:  # no such route or method
            stats.by_status[exc.status] += 1
            raise
        if settings.latency_s > 0:
            await asyncio.sleep(settings.latency_s)
        stats.by_status[response.status] += 1
        if response.status == 429:
            stats.rate_limited += 1
        return response

    async def _admitted(
        self, request: web.Request, handler: Handler, now: float, settings: SimulatorSettings
    ) -> web.StreamResponse:
        query_token = request.query.get("token")
        if query_token is not None:
            self.stats.token_in_url += 1
        token = request.headers.get(TOKEN_HEADER) or query_token
        if not token:
            return _json(401, MISSING_KEY)
        if settings.tokens is not None and token not in settings.tokens:
            return _json(401, INVALID_KEY)
        admitted, limit_headers = self._admit(token, now, settings)
        if not admitted:
            return _json(429, LIMIT_REACHED, limit_headers)
        if settings.error_rate > 0 and self._rng.random() < settings.error_rate:
            if self._rng.random() < 0.5:
                return _json(500, SERVER_ERROR)
            return web.Response(status=502, text=BAD_GATEWAY_HTML, content_type="text/html")
        response = await handler(request)
        response.headers.update(limit_headers)
        return response

    def _admit(
        self, token: str, now: float, settings: SimulatorSettings
    ) -> tuple[bool, dict[str, str]]:
        """Sliding windows (now-1, now] and (now-60, now] over admitted arrivals of `token`."""
        window = self._windows.get(token)
        if window is None:
            window = self._windows[token] = _Window()
        second, minute = window.second, window.minute
        while second and second[0] <= now - 1.0:
            second.popleft()
        while minute and minute[0] <= now - 60.0:
            minute.popleft()
        per_s, per_min = settings.requests_per_second, settings.requests_per_minute
        admitted = (per_s is None or len(second) < per_s) and (
            per_min is None or len(minute) < per_min
        )
        if admitted:
            second.append(now)
            minute.append(now)
        if per_min is None:
            return admitted, {}
        wall = self._clock()
        reset = wall + (minute[0] + 60.0 - now) if minute else wall
        return admitted, {
            "X-Ratelimit-Limit": str(per_min),
            "X-Ratelimit-Remaining": str(max(0, per_min - len(minute))),
            "X-Ratelimit-Reset": str(math.ceil(reset)),
        }

    async def _trouble(self, symbol: str) -> web.Response | None:
        """The answer for a hang or fail symbol; a hang ends when the client or server gives up."""
        if symbol in self.settings.hang_symbols:
            await self._closing.wait()  # aiohttp cancels us when the client disconnects
            return _json(503, {"error": "Simulator stopped"})
        if symbol in self.settings.fail_symbols:
            return _json(500, SERVER_ERROR)
        return None

    async def _quote(self, request: web.Request) -> web.Response:
        symbol, settings = request.query.get("symbol", ""), self.settings
        if not symbol:
            return _json(422, {"error": "symbol is required"})
        if trouble := await self._trouble(symbol):
            return trouble
        if symbol in settings.fail_quote_symbols:
            return _json(500, SERVER_ERROR)
        minute = minute_slot(self._clock())
        body = (
            dict(UNKNOWN_QUOTE) if symbol in settings.unknown_symbols else quote_for(symbol, minute)
        )
        self.stats.served.append((symbol, minute, body))
        self._wake_served()
        return _json(200, body)

    async def wait_served(self, count: int) -> None:
        """Return once at least `count` quotes have been served (since the last reset)."""
        if len(self.stats.served) >= count:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._served_waiters.append((count, waiter))
        await waiter

    def _wake_served(self) -> None:
        served = len(self.stats.served)
        for entry in [w for w in self._served_waiters if w[0] <= served]:
            self._served_waiters.remove(entry)
            if not entry[1].done():
                entry[1].set_result(None)

    async def _candle(self, request: web.Request) -> web.Response:
        query, settings = request.query, self.settings
        if not settings.premium:
            return _json(403, NO_ACCESS)
        if query.get("resolution") != "1":
            return _json(422, {"error": "Unsupported resolution"})
        symbol = query.get("symbol", "")
        try:
            minutes = range(-(-int(query["from"]) // 60) * 60, int(query["to"]) + 1, 60)
        except (KeyError, ValueError):
            return _json(422, {"error": "from and to must be epoch seconds"})
        if trouble := await self._trouble(symbol):
            return trouble
        no_data = symbol in settings.unknown_symbols or symbol in settings.no_candle_symbols
        if not symbol or not minutes or no_data:
            return _json(200, {"s": "no_data"})
        bars = [candle_for(symbol, m) for m in minutes]
        body: Json = {"s": "ok"} | {key: [bar[key] for bar in bars] for key in "tohlcv"}
        return _json(200, body)

    async def _market_status(self, request: web.Request) -> web.Response:
        now = self._clock()
        local = datetime.fromtimestamp(now, NEW_YORK)
        is_open = local.weekday() < 5 and REGULAR_OPEN <= local.time() < REGULAR_CLOSE
        return _json(
            200,
            {
                "exchange": request.query.get("exchange", "US"),
                "holiday": None,
                "isOpen": is_open,
                "session": "regular" if is_open else "closed",
                "t": int(now),
                "timezone": "America/New_York",
            },
        )


async def serve(settings: SimulatorSettings, host: str, port: int, stop: asyncio.Event) -> None:
    """Run a simulator until `stop` is set (`finnstream simulate`)."""
    async with Simulator(settings, host=host, port=port) as sim:
        if structlog is not None:
            structlog.get_logger("finnstream.simulator").info("simulator.listening", url=sim.url)
        else:  # pragma: no cover
            print(f"simulator.listening url={sim.url}", flush=True)
        await stop.wait()
