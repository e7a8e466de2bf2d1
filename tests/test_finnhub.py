"""The Finnhub client against small aiohttp servers: parsing, limits on answers, redirects,
token rotation and deadlines. End-to-end behaviour with the simulator is in test_pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from finnstream.clock import FakeClock
from finnstream.errors import DeadlinePassed, FinnhubError
from finnstream.finnhub import TOKEN_HEADER, FinnhubClient, parse_candles
from finnstream.limiter import SECOND_GUARD, RateLimiter
from finnstream.records import BadAnswer, candle_record
from finnstream.simulator import Simulator, SimulatorSettings
from finnstream.transport import MAX_BODY_BYTES, MAX_REDIRECTS, Answer

TOKEN = "stub-token-0123456789"  # as long as a real one
MINUTE = 1_718_634_600

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Stub:
    """An HTTP server on loopback whose answer a test sets (`stub.handler`); it keeps requests."""

    def __init__(self) -> None:
        self.handler: Handler = self._ok
        self.requests: list[web.Request] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @staticmethod
    async def _ok(request: web.Request) -> web.StreamResponse:
        return web.json_response({"c": 1.0, "t": MINUTE})

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        return await self.handler(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/api/v1"

    async def __aenter__(self) -> Stub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    async with Stub() as server:
        yield server


def answering(body: Any, status: int = 200) -> Handler:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=raw, content_type="application/json")

    return handler


def client_for(base_url: str, **kwargs: Any) -> FinnhubClient:
    kwargs.setdefault("timeout_s", 2.0)
    kwargs.setdefault("retries", 0)
    return FinnhubClient(
        base_url, TOKEN, RateLimiter(per_second=1000, per_minute=100_000), **kwargs
    )


# --- candles: odd shapes raise FinnhubError, odd values BadAnswer -----------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner),
    max_leaves=8,
)
COLUMN = st.lists(JSON, max_size=3) | JSON
CANDLE_LIKE = st.fixed_dictionaries(
    {"s": st.sampled_from(["ok", "no_data", "error"]) | JSON},
    optional={k: COLUMN for k in ("t", "o", "h", "l", "c", "v")},
)


@settings(max_examples=300, database=None)
@given(body=CANDLE_LIKE | JSON)
def test_any_candle_answer_gives_bars_or_finnhub_error_and_each_bar_a_record_or_bad_answer(
    body: Any,
) -> None:
    try:
        bars = parse_candles("AAPL", body)
    except FinnhubError as exc:
        assert not exc.retriable
        return
    for bar in bars:
        with contextlib.suppress(BadAnswer):
            candle_record("AAPL", MINUTE, bar, 0.0)


@pytest.mark.parametrize(
    "body",
    [
        [1, 2],
        {"s": "ok"},
        {"s": "ok", "t": "ab", "o": "ab", "h": "ab", "l": "ab", "c": "ab", "v": "ab"},
        {"s": "ok", "t": {"a": 1}, "o": {"a": 1}, "h": {}, "l": {}, "c": {}, "v": {}},
        {"s": "ok", "t": [1], "o": [1], "h": [1], "l": [1], "c": [1], "v": []},
        {"s": ["ok"]},
    ],
    ids=["list", "no-columns", "string-columns", "object-columns", "unequal", "s-list"],
)
async def test_candles_of_an_odd_shape_raise_finnhub_error(stub: Stub, body: Any) -> None:
    stub.handler = answering(body)
    async with client_for(stub.base_url) as client:
        with pytest.raises(FinnhubError, match="candles for AAPL"):
            await client.candles("AAPL", MINUTE, MINUTE, deadline=math.inf)


async def test_candles_become_one_dict_per_bar(stub: Stub) -> None:
    stub.handler = answering(
        {"s": "ok", "t": [MINUTE], "o": [1.0], "h": [2.0], "l": [0.5], "c": [1.5], "v": [10]}
    )
    async with client_for(stub.base_url) as client:
        bars = await client.candles("AAPL", MINUTE, MINUTE, deadline=math.inf)

    assert bars == [{"t": MINUTE, "o": 1.0, "h": 2.0, "l": 0.5, "c": 1.5, "v": 10}]


# --- an injected transport: everything but the wire stays in the client ----------------------

Step = Answer | BaseException | Callable[[Mapping[str, str]], Answer]


class Scripted:
    """A transport answering from a script, one step per request; it records every call."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.calls: list[tuple[str, dict[str, str], dict[str, str], float]] = []

    async def __call__(
        self, url: str, params: Mapping[str, str], headers: Mapping[str, str], timeout_s: float
    ) -> Answer:
        self.calls.append((url, dict(params), dict(headers), timeout_s))
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, BaseException):
            raise step
        if callable(step):
            return step(headers)
        return step


def quote_answer(price: float = 1.0) -> Answer:
    return Answer(200, orjson.dumps({"c": price, "t": MINUTE}))


def scripted_client(
    transport: Scripted, clock: FakeClock | None = None, per_second: int = 1, **kwargs: Any
) -> FinnhubClient:
    clock = clock or FakeClock()
    kwargs.setdefault("retries", 3)
    return FinnhubClient(
        "https://finnhub.example/api/v1",
        TOKEN,
        RateLimiter(per_second=per_second, per_minute=100, clock=clock),
        timeout_s=4.0,
        clock=clock,
        transport=transport,
        **kwargs,
    )


async def test_requests_go_through_the_injected_transport_and_the_limiter() -> None:
    clock = FakeClock()
    transport = Scripted(quote_answer(2.5))
    client = scripted_client(transport, clock)  # no open(): the transport is the caller's

    first = await client.quote("AAPL", deadline=math.inf)
    await client.quote("BRK.B", deadline=math.inf)
    await client.close()

    assert first == {"c": 2.5, "t": MINUTE}
    assert transport.calls == [
        ("https://finnhub.example/api/v1/quote", {"symbol": s}, {TOKEN_HEADER: TOKEN}, 4.0)
        for s in ("AAPL", "BRK.B")
    ]
    assert clock.sleeps == pytest.approx([SECOND_GUARD])  # the second waited for the limiter


async def test_retries_timeouts_connection_failures_and_5xx_run_the_same_with_any_transport() -> (
    None
):
    transport = Scripted(
        TimeoutError(),
        FinnhubError("ClientConnectorError", retriable=True),
        Answer(502, b"<html>bad gateway</html>"),
        quote_answer(),
    )

    body = await scripted_client(transport).quote("AAPL", deadline=math.inf)

    assert body == {"c": 1.0, "t": MINUTE}
    assert len(transport.calls) == 4


async def test_a_transport_failure_is_named_with_the_request() -> None:
    transport = Scripted(FinnhubError("ClientConnectorError", retriable=True))

    with pytest.raises(FinnhubError, match=r"^GET /quote AAPL: ClientConnectorError$") as info:
        await scripted_client(transport, retries=0).quote("AAPL", deadline=math.inf)

    assert info.value.retriable


async def test_rate_limit_headers_come_from_the_answer_and_the_injected_clock() -> None:
    clock = FakeClock(start=1_000.0)
    retry = Scripted(Answer(429, b"{}", retry_after="2"))
    reset = Scripted(Answer(429, b"{}", ratelimit_reset="1005"))

    with pytest.raises(FinnhubError) as after:
        await scripted_client(retry, clock, retries=0).quote("AAPL", deadline=math.inf)
    with pytest.raises(FinnhubError) as until:
        await scripted_client(reset, clock, retries=0).quote("AAPL", deadline=math.inf)

    assert (after.value.status, after.value.retry_after) == (429, 2.0)
    assert (until.value.status, until.value.retry_after) == (429, pytest.approx(5.0))


async def test_a_401_rereads_the_secret_with_any_transport() -> None:
    async def rotated() -> str:
        return "new-token-0123456789"

    def answer(headers: Mapping[str, str]) -> Answer:
        return quote_answer() if headers[TOKEN_HEADER] == "new-token-0123456789" else Answer(401)

    transport = Scripted(answer)

    body = await scripted_client(transport, refresh_token=rotated).quote("AAPL", math.inf)

    assert body == {"c": 1.0, "t": MINUTE}
    assert [c[2][TOKEN_HEADER] for c in transport.calls] == [TOKEN, "new-token-0123456789"]


async def test_the_default_transport_must_be_opened_and_closes_cleanly(stub: Stub) -> None:
    client = client_for(stub.base_url)
    with pytest.raises(RuntimeError, match="before open"):
        await client.quote("AAPL", deadline=math.inf)

    client.open()
    client.open()  # idempotent
    assert await client.quote("AAPL", deadline=math.inf) == {"c": 1.0, "t": MINUTE}
    await client.close()
    await client.close()  # idempotent


# --- redirects: the token never leaves Finnhub's origin ---------------------------------------


@pytest.fixture
async def elsewhere() -> AsyncIterator[Stub]:
    """A second server, on another origin, that records what reaches it."""
    async with Stub() as server:
        yield server


def redirecting(location: str, status: int = 302) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": location})

    return handler


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_to_another_origin_is_not_followed(
    stub: Stub, elsewhere: Stub, status: int
) -> None:
    stub.handler = redirecting(f"{elsewhere.origin}/collect?token=leak-4711&symbol=AAPL", status)

    async with client_for(stub.base_url, retries=3) as client:
        with pytest.raises(FinnhubError) as info:
            await client.quote("AAPL", deadline=math.inf)

    assert elsewhere.requests == []  # nothing, and no token, reached the other origin
    assert len(stub.requests) == 1  # and it is not retried
    message = str(info.value)
    assert f"another origin ({elsewhere.origin})" in message
    assert TOKEN not in message and "leak-4711" not in message and "collect" not in message
    assert not info.value.retriable


async def test_a_redirect_to_another_port_or_scheme_of_the_same_host_is_another_origin(
    stub: Stub,
) -> None:
    stub.handler = redirecting(f"https://127.0.0.1:{stub.port}/api/v1/quote?symbol=AAPL")

    async with client_for(stub.base_url) as client:
        with pytest.raises(
            FinnhubError, match=rf"another origin \(https://127.0.0.1:{stub.port}\)"
        ):
            await client.quote("AAPL", deadline=math.inf)


async def test_a_same_origin_redirect_is_followed_with_the_token(stub: Stub) -> None:
    async def route(request: web.Request) -> web.StreamResponse:
        if request.path == "/api/v1/quote":
            return web.Response(status=307, headers={"Location": "/api/v2/quote?symbol=AAPL"})
        return web.json_response({"c": 7.5, "t": MINUTE, "path": request.path})

    stub.handler = route

    async with client_for(stub.base_url) as client:
        body = await client.quote("AAPL", deadline=math.inf)

    assert body == {"c": 7.5, "t": MINUTE, "path": "/api/v2/quote"}
    assert [r.headers.get(TOKEN_HEADER) for r in stub.requests] == [TOKEN, TOKEN]
    assert stub.requests[1].query_string == "symbol=AAPL"


async def test_same_origin_redirects_are_followed_a_few_times_only(stub: Stub) -> None:
    stub.handler = redirecting("/api/v1/quote?symbol=AAPL")

    async with client_for(stub.base_url, retries=3) as client:
        with pytest.raises(FinnhubError, match=f"more than {MAX_REDIRECTS} redirects") as info:
            await client.quote("AAPL", deadline=math.inf)

    assert len(stub.requests) == MAX_REDIRECTS + 1
    assert not info.value.retriable


# --- the body is capped -----------------------------------------------------------------------


def padded_quote(size: int) -> bytes:
    """A valid quote answer of exactly `size` bytes."""
    head, tail = b'{"c":1.0,"t":1718634600,"pad":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def test_an_answer_declaring_more_than_the_cap_is_refused_before_reading(
    stub: Stub,
) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 10 * 1024**3  # 10 GiB promised; a trickle, then nothing
        await resp.prepare(request)
        await resp.write(b'{"c": 1.0, "pad": "')
        await asyncio.sleep(30)
        return resp

    stub.handler = endless

    async with client_for(stub.base_url, timeout_s=10.0, retries=3) as client:
        with pytest.raises(FinnhubError, match="larger than the 4 MiB cap") as info:
            await asyncio.wait_for(client.quote("AAPL", deadline=math.inf), timeout=5.0)

    assert "Content-Length 10737418240" in str(info.value)
    assert not info.value.retriable and len(stub.requests) == 1


@pytest.mark.parametrize("encoding", ["chunked", "gzip"])
async def test_a_chunked_or_compressed_answer_past_the_cap_is_refused(
    stub: Stub, encoding: str
) -> None:
    body = padded_quote(MAX_BODY_BYTES + 1)  # valid JSON: only its size is wrong

    async def large(request: web.Request) -> web.StreamResponse:
        if encoding == "gzip":
            packed = gzip.compress(body)
            assert len(packed) < MAX_BODY_BYTES // 100  # the header alone would let it through
            return web.Response(
                body=packed,
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for at in range(0, len(body), 256 * 1024):
                await resp.write(body[at : at + 256 * 1024])
            await resp.write_eof()
        return resp

    stub.handler = large

    async with client_for(stub.base_url) as client:
        with pytest.raises(FinnhubError, match="larger than the 4 MiB cap") as info:
            await client.quote("AAPL", deadline=math.inf)

    assert not info.value.retriable


async def test_an_answer_up_to_the_cap_is_read_whole(stub: Stub) -> None:
    stub.handler = answering(padded_quote(MAX_BODY_BYTES))

    async with client_for(stub.base_url) as client:
        body = await client.quote("AAPL", deadline=math.inf)

    assert body["c"] == 1.0 and len(body["pad"]) > MAX_BODY_BYTES - 64


# --- token rotation: quotes refused with the old token retry with the new one -----------------

ROTATED = "rotated-token-0123456"


class Secret:
    """A secret whose re-read takes a while (so refused quotes queue behind it); counts reads."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.reads = 0

    async def read(self) -> str:
        self.reads += 1
        await asyncio.sleep(0.05)
        return self.value


async def test_concurrent_quotes_refused_with_the_old_token_all_retry_with_the_new_one() -> None:
    symbols = ["AAPL", "MSFT", "AMZN", "NVDA", "META", "TSLA", "GOOGL", "JPM"]
    secret = Secret(ROTATED)
    async with Simulator(SimulatorSettings(tokens=frozenset({ROTATED}))) as sim:
        client = FinnhubClient(
            sim.url,
            TOKEN,  # the secret was rotated before this process read it again
            RateLimiter(per_second=1000, per_minute=100_000),
            timeout_s=2.0,
            retries=0,
            refresh_token=secret.read,
        )
        async with client:
            with capture_logs() as logs:
                bodies = await asyncio.gather(*(client.quote(s, math.inf) for s in symbols))

    served = {symbol: body for symbol, _, body in sim.stats.served}
    assert bodies == [served[s] for s in symbols]
    assert secret.reads == 1  # one re-read, however many quotes were refused
    assert client.token_valid
    assert [e["event"] for e in logs] == ["finnhub.token_rotated"]
    assert sim.stats.by_status[401] == len(symbols)  # each was refused once, then served
    assert sim.stats.by_status[200] == len(symbols)


async def test_a_quote_refused_after_the_rotation_retries_without_reading_again() -> None:
    secret = Secret(ROTATED)

    def answer(headers: Mapping[str, str]) -> Answer:
        return quote_answer() if headers[TOKEN_HEADER] == ROTATED else Answer(401)

    transport = Scripted(answer)
    client = scripted_client(transport, refresh_token=secret.read)
    old = client._generation  # a request sent before the rotation, refused after it
    await client.quote("AAPL", math.inf)  # refused, re-reads, rotates

    assert await client._try_refresh(old) is True
    assert secret.reads == 1


async def test_a_dead_token_still_fails_and_is_read_at_most_once_a_minute() -> None:
    secret = Secret(TOKEN)  # the secret still holds the refused token
    transport = Scripted(Answer(401))
    client = scripted_client(transport, refresh_token=secret.read, retries=0)

    results = await asyncio.gather(
        *(client.quote(s, math.inf) for s in ("AAPL", "MSFT", "AMZN")), return_exceptions=True
    )

    assert all(isinstance(r, FinnhubError) and r.status == 401 for r in results)
    assert secret.reads == 1
    assert not client.token_valid


# --- deadlines: no attempt starts at or after it; every attempt that starts has its timeout ---


def paced_client(transport: Scripted, clock: FakeClock, **kwargs: Any) -> FinnhubClient:
    """A client on a limiter of 2 starts a minute (10 a second): the third waits past 60 s."""
    return FinnhubClient(
        "https://finnhub.example/api/v1",
        TOKEN,
        RateLimiter(per_second=10, per_minute=2, clock=clock),
        timeout_s=4.0,
        retries=3,
        clock=clock,
        transport=transport,
        **kwargs,
    )


async def test_a_quote_the_limiter_cannot_start_before_its_deadline_is_not_requested() -> None:
    clock = FakeClock()
    transport = Scripted(quote_answer())
    client = paced_client(transport, clock)
    deadline = clock.monotonic() + 58.0  # the cycle's retry window

    results = await asyncio.gather(
        *(client.quote(s, deadline) for s in ("AAPL", "MSFT", "AMZN", "NVDA")),
        return_exceptions=True,
    )

    assert results[:2] == [{"c": 1.0, "t": MINUTE}] * 2
    for late in results[2:]:
        assert isinstance(late, DeadlinePassed) and isinstance(late, FinnhubError)
        assert "the quote's minute ran out before it could be requested" in str(late)
        assert not late.retriable
    assert [c[1]["symbol"] for c in transport.calls] == ["AAPL", "MSFT"]  # never sent
    assert clock.monotonic() < 1.0  # and nobody waited for the next minute's slots


async def test_a_start_exactly_at_the_deadline_is_too_late() -> None:
    clock = FakeClock()
    transport = Scripted(quote_answer())
    client = paced_client(transport, clock)

    await client.quote("AAPL", deadline=58.0)
    with pytest.raises(DeadlinePassed):
        await client.quote("MSFT", deadline=SECOND_GUARD / 10)  # its slot starts at the deadline

    assert len(transport.calls) == 1


async def test_every_attempt_that_starts_gets_the_full_timeout_even_near_the_deadline() -> None:
    clock = FakeClock()
    transport = Scripted(TimeoutError(), Answer(503), quote_answer())
    client = scripted_client(transport, clock, per_second=100)

    body = await client.quote("AAPL", deadline=clock.monotonic() + 0.5)

    assert body == {"c": 1.0, "t": MINUTE}
    assert [c[3] for c in transport.calls] == [4.0, 4.0, 4.0]  # never cut to the deadline


async def test_a_retry_that_cannot_start_in_time_raises_the_last_failure() -> None:
    clock = FakeClock()
    transport = Scripted(Answer(502))
    client = paced_client(transport, clock)

    with pytest.raises(FinnhubError) as info:
        await client.quote("AAPL", deadline=58.0)  # 2 attempts fit the minute's window

    assert not isinstance(info.value, DeadlinePassed)  # it was requested: HTTP 502 says why
    assert str(info.value) == "GET /quote AAPL: HTTP 502"
    assert len(transport.calls) == 2


async def test_candles_keep_the_same_deadline_rule() -> None:
    clock = FakeClock()
    transport = Scripted(Answer(200, orjson.dumps({"s": "no_data"})))
    client = paced_client(transport, clock)
    await client.quote("AAPL", 58.0)
    await client.quote("MSFT", 58.0)

    with pytest.raises(DeadlinePassed, match="ran out before it could be requested"):
        await client.candles("AAPL", MINUTE, MINUTE, deadline=30.0)

    assert len(transport.calls) == 2
