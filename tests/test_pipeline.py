"""End to end over real HTTP: the simulator as Finnhub, moto as Kinesis and Secrets Manager."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from structlog.testing import capture_logs

from finnstream.app import App
from finnstream.clock import minute_slot
from finnstream.config import load_config, minute_capacity
from finnstream.simulator import Simulator, quote_for

from .conftest import Aws, ConfigFactory, current_wall, quotes_served

ODD = [
    "AAPL",
    "MSFT",
    "BRK.B",
    "^GSPC",
    "BTC-USD",
    "GOOGL",
    "NVDA",
    "TSLA",
    "META",
    "AMZN",
    "JPM",
    "ZZZZ",
]  # ZZZZ is unknown to Finnhub


async def run_once(path: Path, aws: Aws, **environ: str) -> tuple[int, App]:
    env = {"AWS_ENDPOINT_URL": aws.url, **environ}
    cfg, _ = load_config(path, environ=env)
    app = App(cfg, environ=env, clock=current_wall())
    async with app:
        code = await app.run_once()
    return code, app


async def test_one_cycle_lands_one_true_record_per_known_symbol(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    code, app = await run_once(make_config(ODD), aws)
    assert code == 0
    records = aws.records()
    known = [s for s in ODD if s != "ZZZZ"]
    assert sorted(r["symbol"] for r in records) == sorted(known)
    minutes = {r["minute"] for r in records}
    assert len(minutes) == 1
    (minute,) = minutes
    assert minute % 60 == 0
    served = {(s, m): body for s, m, body in quotes_served(sim)}
    for rec in records:
        body = served[(rec["symbol"], minute)]
        assert body == quote_for(rec["symbol"], minute)
        assert rec["price"] == body["c"] and rec["open"] == body["o"] and rec["high"] == body["h"]
        assert rec["low"] == body["l"] and rec["previous_close"] == body["pc"]
        assert rec["change"] == body["d"] and rec["change_percent"] == body["dp"]
        assert rec["quote_time"] == body["t"] and rec["volume"] is None
        assert rec["schema"] == 1 and rec["source"] == "quote"
        assert minute_slot(rec["fetched_at"]) in (minute, minute + 60)
    assert app.metrics.put_calls.labels(result="ok")._value.get() == 1  # one PutRecords call
    assert sim.stats.token_in_url == 0


class FastForwardClock:
    """Real time, except that sleeping moves both clocks forward at once (no real wait).

    The wall clock starts `at_second` seconds into a minute, so a cycle's minute is predictable.
    """

    def __init__(self, at_second: float = 1.0) -> None:
        self.skipped = 0.0
        self._shift = (at_second - time.time() % 60) % 60

    def time(self) -> float:
        return time.time() + self._shift + self.skipped

    def monotonic(self) -> float:
        return time.monotonic() + self.skipped

    async def sleep(self, seconds: float) -> None:
        self.skipped += max(0.0, seconds)
        await asyncio.sleep(0)


async def test_symbols_the_pace_cannot_reach_within_the_minute_are_not_requested_but_ledgered(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    symbols = ["AAPL", "MSFT", "AMZN", "NVDA", "META"]
    path = make_config(symbols, finnhub={"requests_per_minute": 3, "requests_per_second": 5})
    env = {"AWS_ENDPOINT_URL": aws.url}
    cfg, _ = load_config(path, environ=env)
    clock = FastForwardClock()
    with capture_logs() as logs:
        async with App(cfg, environ=env, clock=clock) as app:
            code = await app.run_once()
            gaps = {g.symbol: g.reason for g in app.ledger.open_gaps()}
    assert code == 0  # everything fetched was delivered; the rest is in the gap ledger
    warning = next(e for e in logs if e["event"] == "config.over_capacity")
    assert warning["symbols"] == 5 and warning["fit_a_minute"] == minute_capacity(cfg.finnhub) == 2
    assert clock.skipped < 10  # nobody waited for the next minute's slots (main: 62 s)
    records = aws.records()
    landed = {r["symbol"] for r in records}
    assert len({r["minute"] for r in records}) == 1
    # At most the minute window's 3 starts (the startup token check takes one) were made: the
    # 3 symbols beyond what fits were not even asked for.
    assert sum(sim.stats.quote_requests.values()) <= 3
    assert landed and set(gaps) == set(symbols) - landed
    not_polled = [s for s, r in gaps.items() if "not polled" in r]
    ran_out = [s for s, r in gaps.items() if "minute ran out before it could be requested" in r]
    assert len(not_polled) == 3 and len(not_polled) + len(ran_out) == len(gaps)
