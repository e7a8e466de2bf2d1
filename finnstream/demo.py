"""`finnstream demo`: the whole pipeline on one machine, with nothing installed beyond the package.

moto's server on loopback stands in for Kinesis and Secrets Manager; the built-in simulator
stands in for Finnhub (or real Finnhub when FINNHUB_TOKEN is set). The daemon runs as it would
in production: a cycle for the current minute at once, then one at second 0 of every minute.
Every record is printed as it lands in the stream, read back with GetRecords.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.util
import os
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
from aiobotocore.session import AioSession

from finnstream.app import App, CycleReport
from finnstream.config import Config
from finnstream.errors import DependencyError
from finnstream.logs import configure_logging, register_secret
from finnstream.secret import ENV_TOKEN

DEMO_SYMBOLS = ("AAPL", "MSFT", "AMZN", "NVDA", "BRK.B", "^GSPC", "BTC-USD")
DEMO_STREAM = "finnstream-demo"
DEMO_SECRET = "finnstream/demo"
DEMO_REGION = "us-east-1"
REAL_FINNHUB = "https://finnhub.io/api/v1"
# The optional `demo` extra (moto's server and what it runs on): not in the container image.
DEMO_EXTRA_MODULES = ("moto", "flask", "flask_cors")


def require_demo_extra() -> None:
    """Say how to install the demo's dependencies when they are not installed."""
    missing = [name for name in DEMO_EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise DependencyError(
            "finnstream demo runs its own Kinesis and Secrets Manager on moto's server, from the "
            f"optional 'demo' dependencies, and they are not installed here ({', '.join(missing)} "
            "missing). Install them with `pip install 'finnstream[demo]'` (in a source checkout: "
            "`pip install -e '.[demo]'`, or just `make demo`). The container image leaves them "
            "out on purpose: run the demo from a checkout, or `docker compose up` for the stack."
        )


def say(text: str) -> None:
    print(text, flush=True)


@contextlib.asynccontextmanager
async def local_aws() -> AsyncIterator[str]:
    """moto's server on an ephemeral loopback port, for as long as the context lasts."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415 - only the demo needs moto

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    await asyncio.to_thread(server.start)
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        await asyncio.to_thread(server.stop)


async def provision(session: AioSession, endpoint: str, token: str) -> None:
    async with session.create_client(
        "kinesis", region_name=DEMO_REGION, endpoint_url=endpoint
    ) as k:
        await k.create_stream(StreamName=DEMO_STREAM, ShardCount=1)
    async with session.create_client(
        "secretsmanager", region_name=DEMO_REGION, endpoint_url=endpoint
    ) as sm:
        await sm.create_secret(
            Name=DEMO_SECRET, SecretString=orjson.dumps({"token": token}).decode()
        )


async def show_records(session: AioSession, endpoint: str, stop: asyncio.Event) -> None:
    """Print every record in the demo stream as it lands (one JSON line each)."""
    async with session.create_client(
        "kinesis", region_name=DEMO_REGION, endpoint_url=endpoint
    ) as k:
        shard = (await k.list_shards(StreamName=DEMO_STREAM))["Shards"][0]["ShardId"]
        iterator = (
            await k.get_shard_iterator(
                StreamName=DEMO_STREAM, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
            )
        )["ShardIterator"]
        while not stop.is_set() and iterator:
            page = await k.get_records(ShardIterator=iterator, Limit=1000)
            for rec in page["Records"]:
                say("  " + rec["Data"].decode().rstrip("\n"))
            iterator = page.get("NextShardIterator")
            if not page["Records"]:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)


def cycle_line(report: CycleReport) -> str:
    at = dt.datetime.fromtimestamp(report.minute, tz=dt.UTC).strftime("%H:%M")
    extra = (
        f", {report.undelivered} not delivered ({report.spooled} spooled)"
        if report.undelivered
        else ""
    )
    extra += f", {report.failed} failed (gaps, refilled later)" if report.failed else ""
    start = (
        f"first request {report.lag_s * 1000:.0f} ms after the tick"
        if report.on_time
        else "started mid-minute (catch-up at start-up)"
    )
    return (
        f"cycle {at} UTC: {report.symbols} symbols, {report.delivered} delivered{extra}, "
        f"{start}, took {report.took_s:.2f} s"
    )


def demo_config(symbols: Sequence[str], base_url: str, endpoint: str, spool: Path) -> Config:
    doc: dict[str, Any] = {
        "symbols": list(symbols),
        "finnhub": {"base_url": base_url, "token_secret_id": DEMO_SECRET},
        "kinesis": {"stream_name": DEMO_STREAM, "region": DEMO_REGION, "endpoint_url": endpoint},
        "spool": {"dir": str(spool)},
        "health": {"port": 0},
        "log": {"level": "WARNING", "format": "console"},
    }
    return Config.model_validate(doc)


async def demo(symbols: Sequence[str] | None, cycles: int | None, stop: asyncio.Event) -> int:
    require_demo_extra()
    configure_logging("WARNING", "console", stream=sys.stderr)
    for var, value in (("AWS_ACCESS_KEY_ID", "demo"), ("AWS_SECRET_ACCESS_KEY", "demo")):
        os.environ.setdefault(var, value)  # moto accepts any; botocore wants some
    real_token = os.environ.get(ENV_TOKEN, "").strip()
    token = real_token or secrets.token_hex(12)
    register_secret(token)
    symbols = list(symbols or DEMO_SYMBOLS)
    session = AioSession()
    async with contextlib.AsyncExitStack() as stack:
        endpoint = await stack.enter_async_context(local_aws())
        await provision(session, endpoint, token)
        if real_token:
            base_url, finnhub_is = REAL_FINNHUB, "real Finnhub (FINNHUB_TOKEN is set)"
        else:
            from finnstream.simulator import Simulator, SimulatorSettings  # noqa: PLC0415

            sim = Simulator(
                SimulatorSettings(
                    tokens=frozenset({token}), requests_per_minute=60, requests_per_second=30
                )
            )
            await stack.enter_async_context(sim)
            base_url, finnhub_is = sim.url, f"the built-in simulator at {sim.url}"
        spool = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="finnstream-demo-")))
        say(f"finnstream demo: Kinesis and Secrets Manager on moto at {endpoint};")
        say(f"Finnhub is {finnhub_is}.")
        say(f"Stream {DEMO_STREAM}, token in secret {DEMO_SECRET}; symbols: {', '.join(symbols)}.")
        say("A cycle runs now, then at second 0 of every minute. Records as they land:")
        cfg = demo_config(symbols, base_url, endpoint, spool)
        app = App(cfg, environ={"AWS_ENDPOINT_URL": endpoint}, session=session)
        done = 0

        def on_cycle(report: CycleReport) -> None:
            nonlocal done
            done += 1
            say(cycle_line(report))
            if cycles is not None and done >= cycles:
                stop.set()

        app.cycle_listeners.append(on_cycle)
        stop_show = asyncio.Event()
        shower = asyncio.create_task(show_records(session, endpoint, stop_show))
        stack.push_async_callback(lambda: asyncio.wait_for(shower, 5))
        stack.callback(stop_show.set)
        async with app:
            watcher = asyncio.create_task(_relay(stop, app))
            try:
                await app.run_forever()
            finally:
                watcher.cancel()
        await asyncio.sleep(0.5)  # let the reader print the last records
    say("demo stopped.")
    return 0


async def _relay(stop: asyncio.Event, app: App) -> None:
    await stop.wait()
    app.request_stop()
