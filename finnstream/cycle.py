"""One cycle: every symbol's quote for one minute slot, fetched concurrently, records published.

Workers pull symbols from a queue; each quote goes through the shared limiter, so the pace is
the limiter's and the concurrency is the connection pool's. Every record is stamped with the
cycle's minute slot, never with the time the answer arrived nor Finnhub's `t`. No request starts
after the minute's deadline (`RETRY_WINDOW_S` after the minute began, by the wall clock, so a
late or paused cycle never fetches a later minute's price under an earlier stamp); a symbol the
pace could not reach in time is a failed quote, and its slot goes to the gap ledger. When the
process is stopping, the limiter refuses new requests at once; answers already received are
published.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from finnstream.clock import SYSTEM_CLOCK, Clock
from finnstream.errors import FinnstreamError
from finnstream.finnhub import MAX_CONNECTIONS, FinnhubClient
from finnstream.kinesis import Publisher
from finnstream.limiter import LimiterClosed, RateLimiter
from finnstream.metrics import Metrics
from finnstream.records import BadAnswer, NotAPrice, is_unknown_symbol, quote_record
from finnstream.slots import STOPPED_REASON

log = structlog.get_logger("finnstream.cycle")

RETRY_WINDOW_S = 58.0  # no attempt at a quote starts later than this into its minute


def split_over_capacity(
    symbols: Sequence[str], capacity: int, minute: int
) -> tuple[list[str], list[str]]:
    """The symbols a minute polls, and those it cannot (more than the plan's pace fits).

    Polling more than fits would make every cycle start later than the one before (the
    limiter's minute window), until none fits at all; so at most `capacity` are asked for,
    a different slice each minute, and the rest are gaps at once, for backfill.
    """
    if len(symbols) <= capacity:
        return list(symbols), []
    offset = (minute // 60 * capacity) % len(symbols)
    rotated = [*symbols[offset:], *symbols[:offset]]
    return rotated[:capacity], rotated[capacity:]


@dataclass
class CycleOutcome:
    minute: int
    symbols: int
    published: int = 0
    unknown: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # symbol -> reason; these become gaps
    lag_s: float = 0.0  # tick to the first request's start


class QuoteCycle:
    """Fetches quotes for a minute slot; holds what must outlive one cycle (unknown symbols)."""

    def __init__(
        self,
        client: FinnhubClient,
        limiter: RateLimiter,
        metrics: Metrics,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._client = client
        self._limiter = limiter
        self._metrics = metrics
        self._clock = clock
        self._known_unknown: set[str] = set()
        self._ok = metrics.quotes.labels(outcome="ok")  # looked up once: this is per quote

    async def run(
        self, minute: int, symbols: Sequence[str], publisher: Publisher, minute_mono: float
    ) -> CycleOutcome:
        """Quotes for `minute`; `minute_mono` is the monotonic clock at the minute's second 0."""
        outcome = CycleOutcome(minute=minute, symbols=len(symbols))
        todo = deque(symbols)
        deadline = minute_mono + RETRY_WINDOW_S
        workers = min(len(symbols), MAX_CONNECTIONS)
        outcome.lag_s = self._clock.monotonic() - minute_mono + self._limiter.delay()
        with self._limiter.quotes_busy():
            await asyncio.gather(
                *(self._worker(todo, minute, deadline, publisher, outcome) for _ in range(workers))
            )
        for symbol in todo:  # never started: the process is stopping
            outcome.failed[symbol] = STOPPED_REASON
        return outcome

    async def _worker(
        self,
        todo: deque[str],
        minute: int,
        deadline: float,
        publisher: Publisher,
        outcome: CycleOutcome,
    ) -> None:
        while todo:
            symbol = todo.popleft()
            try:
                body = await self._client.quote(symbol, deadline)
            except LimiterClosed:
                todo.appendleft(symbol)
                return
            except FinnstreamError as exc:
                self._metrics.quotes.labels(outcome="failed").inc()
                outcome.failed[symbol] = str(exc)
                log.warning("quote.failed", symbol=symbol, minute=minute, error=str(exc))
                continue
            self._publish(symbol, minute, body, publisher, outcome)

    def _publish(
        self,
        symbol: str,
        minute: int,
        body: dict[str, object],
        publisher: Publisher,
        outcome: CycleOutcome,
    ) -> None:
        if is_unknown_symbol(body):
            self._metrics.quotes.labels(outcome="unknown_symbol").inc()
            outcome.unknown.append(symbol)
            if symbol not in self._known_unknown:
                self._known_unknown.add(symbol)
                log.warning(
                    "quote.unknown_symbol",
                    symbol=symbol,
                    hint="Finnhub answered c=0, t=0: check the ticker; it is not published",
                )
            return
        try:
            record = quote_record(symbol, minute, body, self._clock.time())
        except NotAPrice as exc:
            self._metrics.quotes.labels(outcome="not_a_price").inc()
            outcome.failed[symbol] = f"Finnhub's answer is not a price: {exc}"
            log.warning("quote.not_a_price", symbol=symbol, minute=minute, error=str(exc))
            return
        except BadAnswer as exc:
            self._metrics.quotes.labels(outcome="bad_answer").inc()
            outcome.failed[symbol] = f"malformed answer: {exc}"
            log.warning("quote.bad_answer", symbol=symbol, minute=minute, error=str(exc))
            return
        refused = publisher.add(record)
        if refused is not None:
            outcome.failed[symbol] = refused
            return
        self._ok.inc()
        outcome.published += 1
