"""How one Finnhub request goes over the wire: an injectable `Transport`, aiohttp by default.

A transport sends one GET and returns what came back as an `Answer`; it decides nothing else.
The limiter, retries, the 401 refresh, parsing and deadlines stay in `FinnhubClient`, so they run
the same with any transport (a deterministic simulation passes its own). A transport raises
`TimeoutError` when `timeout_s` runs out and `FinnhubError(retriable=True)` when the connection
fails; everything else is an `Answer`, whatever its status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp

from finnstream.errors import FinnhubError


@dataclass(frozen=True, slots=True)
class Answer:
    """What a transport got back: the status, the headers the client reads, the body."""

    status: int
    body: bytes = b""
    retry_after: str | None = None  # the Retry-After header, as sent
    ratelimit_reset: str | None = None  # the X-Ratelimit-Reset header, as sent


# (url, params, headers, timeout_s) -> Answer
Transport = Callable[[str, Mapping[str, str], Mapping[str, str], float], Awaitable[Answer]]


class AiohttpTransport:
    """The default transport: one pooled aiohttp session for every request."""

    def __init__(self, max_connections: int) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None)
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(
        self, url: str, params: Mapping[str, str], headers: Mapping[str, str], timeout_s: float
    ) -> Answer:
        if self._session is None:
            raise RuntimeError("FinnhubClient used before open()")
        try:
            async with asyncio.timeout(timeout_s):
                return await self._exchange(self._session, url, params, headers)
        except TimeoutError:
            raise
        except aiohttp.ClientError as exc:
            raise FinnhubError(type(exc).__name__, retriable=True) from None

    @staticmethod
    async def _exchange(
        session: aiohttp.ClientSession,
        url: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
    ) -> Answer:
        async with session.get(url, params=params, headers=headers) as resp:
            return Answer(
                resp.status,
                await resp.read(),
                resp.headers.get("Retry-After"),
                resp.headers.get("X-Ratelimit-Reset"),
            )
