"""How one Finnhub request goes over the wire: an injectable `Transport`, aiohttp by default.

A transport sends one GET and returns what came back as an `Answer`; it decides nothing else.
The limiter, retries, the 401 refresh, parsing and deadlines stay in `FinnhubClient`, so they run
the same with any transport (a deterministic simulation passes its own). A transport raises
`TimeoutError` when `timeout_s` runs out and `FinnhubError(retriable=True)` when the connection
fails; everything else is an `Answer`, whatever its status.

The aiohttp transport keeps the token with Finnhub: it follows a redirect only within the
origin (scheme, host, port) of the URL it was asked for, at most `MAX_REDIRECTS` times, and
refuses one to any other origin with a non-retriable error naming that origin (never the
token, nor the path or query it pointed to). It reads at most `MAX_BODY_BYTES` of an answer:
a larger Content-Length is refused before reading, and a chunked or compressed body is read in
bounded chunks and refused once it grows past the cap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from finnstream.errors import FinnhubError

MAX_REDIRECTS = 3  # same-origin redirects followed per request
MAX_BODY_BYTES = 4 * 1024 * 1024  # a day of 1-minute candles is about 100 KB
READ_CHUNK_BYTES = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


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
        target, home = URL(url), _origin(URL(url))
        query: Mapping[str, str] | None = params
        for _ in range(MAX_REDIRECTS + 1):
            async with session.get(
                target, params=query, headers=headers, allow_redirects=False
            ) as resp:
                location = resp.headers.get("Location")
                if resp.status not in REDIRECT_STATUSES or not location:
                    return Answer(
                        resp.status,
                        await _read_capped(resp),
                        resp.headers.get("Retry-After"),
                        resp.headers.get("X-Ratelimit-Reset"),
                    )
                target, query = _redirect_target(resp.url, location, home, resp.status), None
        raise FinnhubError(
            f"more than {MAX_REDIRECTS} redirects; not followed further", retriable=False
        )


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """The body, decoded, if it is at most `MAX_BODY_BYTES`; else a non-retriable FinnhubError."""
    declared = resp.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        resp.close()  # drop the connection rather than read what will not be used
        raise _too_large(resp.status, f"Content-Length {declared}")
    if declared is not None and not resp.headers.get("Content-Encoding"):
        return await resp.read()  # the usual case: its size is known and within the cap
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            resp.close()
            raise _too_large(resp.status, f"more than {MAX_BODY_BYTES} bytes read")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(status: int, detail: str) -> FinnhubError:
    return FinnhubError(
        f"HTTP {status} answer larger than the {MAX_BODY_BYTES // (1024 * 1024)} MiB cap "
        f"({detail}); not read",
        retriable=False,
        status=status,
    )


def _origin(url: URL) -> str:
    """scheme://host:port, the port explicit (80 and 443 included): what a token may go to."""
    return f"{url.scheme}://{url.host_subcomponent}:{url.port}"


def _redirect_target(current: URL, location: str, home: str, status: int) -> URL:
    """Where a redirect points, if that is within `home`; else a non-retriable FinnhubError."""
    try:
        target = current.join(URL(location))
        origin = _origin(target)
    except ValueError:
        raise FinnhubError(
            f"HTTP {status} redirect to an invalid location; not followed",
            retriable=False,
            status=status,
        ) from None
    if origin != home:
        raise FinnhubError(
            f"HTTP {status} redirect to another origin ({origin}); not followed, so the "
            f"token never leaves {home}",
            retriable=False,
            status=status,
        )
    return target
