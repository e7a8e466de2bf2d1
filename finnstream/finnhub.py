"""The Finnhub REST client: every request through the shared rate limiter and one transport.

The token travels only in the `X-Finnhub-Token` header. Retries (timeouts, connection errors,
5xx, 429) are declared with stamina, bounded by attempts and by the caller's deadline, and honour
`Retry-After` / `X-Ratelimit-Reset`. A 401 triggers one re-read of the secret (rotation). How a
request goes over the wire is the transport's business (`finnstream.transport`: aiohttp unless
one is injected); everything above stays here, the same with any transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import stamina
import structlog

from finnstream.clock import SYSTEM_CLOCK, Clock
from finnstream.errors import CandlesForbidden, DeadlinePassed, FinnhubError, TokenRejected
from finnstream.limiter import Priority, RateLimiter
from finnstream.transport import AiohttpTransport, Answer, Transport

log = structlog.get_logger("finnstream.finnhub")

TOKEN_HEADER = "X-Finnhub-Token"
TOKEN_CHECK_SYMBOL = "FINNSTREAM-TOKEN-CHECK"
MAX_CONNECTIONS = 250  # concurrent sockets to Finnhub; the limiter, not this, sets the pace
REFRESH_EVERY_S = 60.0  # re-read a rotated secret at most once a minute
RETRY_WAIT_INITIAL_S = 0.1
RETRY_WAIT_MAX_S = 2.0

TokenSource = Callable[[], Awaitable[str]]


class _Unauthorized(FinnhubError):
    """A 401; `generation` says which token it refused (see `FinnhubClient._try_refresh`)."""

    def __init__(self, message: str, *, generation: int) -> None:
        super().__init__(message, retriable=False, status=401)
        self.generation = generation


def _retry_after(answer: Answer, wall_now: float) -> float | None:
    header = answer.retry_after
    if header:
        try:
            return max(0.0, float(header))
        except ValueError:
            pass
    reset = answer.ratelimit_reset
    if reset:
        try:
            return max(0.0, float(reset) - wall_now)
        except ValueError:
            pass
    return None


CANDLE_COLUMNS = ("t", "o", "h", "l", "c", "v")


def parse_candles(symbol: str, body: Any) -> list[dict[str, Any]]:
    """The bars of a /stock/candle answer, one dict per bar; [] for `no_data`.

    Any other shape (not an object, an unknown status, a column missing, not a list, or of
    another length) raises a non-retriable `FinnhubError`; the bars' values are checked later,
    by `candle_record`.
    """
    status = body.get("s") if isinstance(body, dict) else None
    if status == "no_data":
        return []
    if status != "ok":
        raise FinnhubError(f"candles for {symbol}: unexpected answer shape", retriable=False)
    columns = [body.get(k) for k in CANDLE_COLUMNS]
    if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) != 1:
        raise FinnhubError(
            f"candles for {symbol}: columns missing, not lists or of unequal length",
            retriable=False,
        )
    return [dict(zip(CANDLE_COLUMNS, row, strict=True)) for row in zip(*columns, strict=True)]


class FinnhubClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        limiter: RateLimiter,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        clock: Clock = SYSTEM_CLOCK,
        refresh_token: TokenSource | None = None,
        transport: Transport | None = None,
    ) -> None:
        """`transport`: how requests go over the wire; None: a pooled aiohttp session, opened
        by `open()` and closed by `close()` (an injected transport is the caller's to manage)."""
        self._base = base_url.rstrip("/")
        self._token = token
        self._limiter = limiter
        self._timeout_s = timeout_s
        self._retries = retries
        self._clock = clock
        self._refresh_token = refresh_token
        self._last_refresh = float("-inf")
        self._generation = 0  # how many times the token was replaced
        self._refresh_lock = asyncio.Lock()
        self._own: AiohttpTransport | None = None
        if transport is None:
            transport = self._own = AiohttpTransport(MAX_CONNECTIONS)
        self._transport = transport
        self.token_valid = True

    async def __aenter__(self) -> FinnhubClient:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def open(self) -> None:
        if self._own is not None:
            self._own.open()

    async def close(self) -> None:
        if self._own is not None:
            await self._own.close()

    @property
    def background_room(self) -> int:
        """Candle requests the limiter lets through per minute beside the quotes."""
        return self._limiter.background_room

    async def quote(self, symbol: str, deadline: float) -> dict[str, Any]:
        """The /quote answer for `symbol`, retried until `deadline` (monotonic seconds).

        No attempt, the first included, starts at or after `deadline`: when the limiter cannot
        start the first one before it (a symbol list longer than a minute's pace), the quote is
        not requested and `DeadlinePassed` says its minute ran out; when a retry cannot start,
        the last attempt's error is raised. Every attempt that starts gets the full `timeout_s`
        (a slow answer keeps its minute).
        """
        body = await self._get_retrying("/quote", {"symbol": symbol}, deadline, Priority.QUOTE)
        if not isinstance(body, dict):
            raise FinnhubError(f"quote for {symbol}: answer is not an object", retriable=False)
        return body

    async def candles(
        self, symbol: str, first: int, last: int, deadline: float
    ) -> list[dict[str, Any]]:
        """1-minute bars for minutes in [first, last]; [] for `no_data`; 403: CandlesForbidden.

        `deadline` as for `quote`: no attempt starts at or after it (`DeadlinePassed` when the
        first cannot, including while quotes hold it back).
        """
        params = {"symbol": symbol, "resolution": "1", "from": str(first), "to": str(last + 59)}
        body = await self._get_retrying("/stock/candle", params, deadline, Priority.BACKGROUND)
        return parse_candles(symbol, body)

    async def check_token(self, symbol: str = TOKEN_CHECK_SYMBOL) -> None:
        """One request at startup: a 401 means the token is wrong (exit 3). It asks for a
        symbol no one configures (Finnhub answers 200 with zeros for an unknown one), so a
        process that takes over never asks a configured symbol twice in a minute."""
        deadline = self._clock.monotonic() + self._timeout_s * (self._retries + 1)
        try:
            await self._get_retrying(
                "/quote", {"symbol": symbol}, deadline, Priority.QUOTE, refresh=False
            )
        except FinnhubError as exc:
            if exc.status == 401:
                raise TokenRejected(
                    "Finnhub rejected the API token (401). Put a valid token in the secret "
                    "(finnhub.token_secret_id) or FINNHUB_TOKEN and start again."
                ) from None
            log.warning("finnhub.check_failed", error=str(exc))

    async def _get_retrying(
        self,
        path: str,
        params: dict[str, str],
        deadline: float,
        priority: Priority,
        *,
        refresh: bool = True,
    ) -> Any:
        def backoff(exc: Exception) -> bool | float:
            if not isinstance(exc, FinnhubError) or not exc.retriable:
                return False
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return False
            if exc.retry_after is not None:
                return min(exc.retry_after, remaining)
            return True

        try:  # the first attempt skips the retry machinery: most requests need nothing more
            return await self._get_refreshing(path, params, deadline, priority, refresh=refresh)
        except FinnhubError as exc:
            if backoff(exc) is False:
                raise
            last = exc
        timeout = max(0.001, deadline - self._clock.monotonic())
        try:
            async for attempt in stamina.retry_context(
                on=backoff,
                attempts=self._retries + 1,
                timeout=timeout,
                wait_initial=RETRY_WAIT_INITIAL_S,
                wait_max=RETRY_WAIT_MAX_S,
            ):
                with attempt:
                    if attempt.num == 1:
                        raise last  # stamina counts it and waits as for any failed attempt
                    try:
                        return await self._get_refreshing(
                            path, params, deadline, priority, refresh=refresh
                        )
                    except DeadlinePassed:
                        raise
                    except FinnhubError as exc:
                        last = exc
                        raise
        except DeadlinePassed:  # a retry could not start in time: the last attempt says why
            raise last from None
        raise AssertionError("unreachable: stamina re-raises the last error")  # pragma: no cover

    async def _get_refreshing(
        self,
        path: str,
        params: dict[str, str],
        deadline: float,
        priority: Priority,
        *,
        refresh: bool,
    ) -> Any:
        """`_get`, re-reading a rotated secret once on 401 and trying once more with it."""
        try:
            return await self._get(path, params, deadline, priority)
        except _Unauthorized as exc:
            if not (refresh and await self._try_refresh(exc.generation)):
                raise
            try:
                return await self._get(path, params, deadline, priority)
            except DeadlinePassed:
                raise exc from None  # it was requested: the 401 is why it has no answer

    async def _get(
        self, path: str, params: dict[str, str], deadline: float, priority: Priority
    ) -> Any:
        """One request through the limiter, started before `deadline`, with a full timeout."""
        what = f"GET {path} {params.get('symbol', '')}".strip()
        try:
            await self._limiter.acquire(priority, deadline=deadline)
        except DeadlinePassed as exc:
            ran_out = "the quote's minute" if path == "/quote" else "its time"
            raise DeadlinePassed(
                f"{what}: {ran_out} ran out before it could be requested: {exc}"
            ) from None
        token, generation = self._token, self._generation
        try:
            answer = await self._transport(
                self._base + path, params, {TOKEN_HEADER: token}, self._timeout_s
            )
        except TimeoutError:
            raise FinnhubError(f"{what}: timed out", retriable=True) from None
        except FinnhubError as exc:  # the transport's words, with what was asked
            raise FinnhubError(
                f"{what}: {exc}", retriable=exc.retriable, status=exc.status
            ) from None
        return self._parse(what, path, answer, generation)

    def _parse(self, what: str, path: str, answer: Answer, generation: int) -> Any:
        status = answer.status
        if status == 200:
            self.token_valid = True
            try:
                return orjson.loads(answer.body)
            except orjson.JSONDecodeError:
                raise FinnhubError(
                    f"{what}: answer is not JSON", retriable=True, status=status
                ) from None
        if status == 401:
            raise _Unauthorized(f"{what}: token rejected (401)", generation=generation)
        if status == 403 and path == "/stock/candle":
            raise CandlesForbidden(
                "Finnhub answered 403 to /stock/candle: this API key's plan has no access to "
                "candles (premium only), so missing minutes cannot be refilled."
            )
        if status == 429:
            retry_after = _retry_after(answer, self._clock.time())
            return self._raise(what, status, retriable=True, retry_after=retry_after)
        return self._raise(what, status, retriable=status >= 500)

    @staticmethod
    def _raise(what: str, status: int, *, retriable: bool, retry_after: float | None = None) -> Any:
        raise FinnhubError(
            f"{what}: HTTP {status}", retriable=retriable, status=status, retry_after=retry_after
        )

    async def _try_refresh(self, refused: int) -> bool:
        """True if the token has changed since generation `refused` was sent: try again with it.

        A request that finds the token already replaced (by a request refused before it, while
        it was in flight or waiting for the lock) retries with the new one. Otherwise the secret
        is re-read, at most once a minute.
        """
        if self._generation != refused:
            return True
        if self._refresh_token is None:
            self.token_valid = False
            return False
        async with self._refresh_lock:
            return self._generation != refused or await self._reread(self._refresh_token)

    async def _reread(self, source: TokenSource) -> bool:
        """Re-read the secret (at most once a minute); True if it holds a new token."""
        now = self._clock.monotonic()
        if now - self._last_refresh < REFRESH_EVERY_S:
            self.token_valid = False
            return False
        self._last_refresh = now
        try:
            new = await source()
        except Exception as exc:  # noqa: BLE001 - any failure to re-read is reported, not raised
            log.error("finnhub.token_refresh_failed", error=str(exc))
            self.token_valid = False
            return False
        if new == self._token:
            self.token_valid = False
            log.error(
                "finnhub.token_rejected",
                action="put a valid token in the secret; "
                "finnstream re-reads it at most once a minute on 401",
            )
            return False
        self._token = new
        self._generation += 1
        self.token_valid = True
        log.warning("finnhub.token_rotated")
        return True
