"""The daemon as it runs for days: the scheduler, health, metrics, rotation, tail, demo."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time

import aiohttp
from structlog.testing import capture_logs

from finnstream.app import App, CycleReport
from finnstream.simulator import Simulator

from .conftest import (
    TOKEN,
    Aws,
    ConfigFactory,
    ShiftedClock,
    current_wall,
    early_in_a_minute,
    subprocess_env,
)
from .test_faults import keys, new_app


class Cycles:
    """Collects cycle reports and lets a test wait for the n-th one."""

    def __init__(self, app: App) -> None:
        self.reports: list[CycleReport] = []
        self._changed = asyncio.Event()
        app.cycle_listeners.append(self._on)

    def _on(self, report: CycleReport) -> None:
        self.reports.append(report)
        self._changed.set()

    async def wait(self, count: int, within: float) -> None:
        async with asyncio.timeout(within):
            while len(self.reports) < count:
                self._changed.clear()
                await self._changed.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


def metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def test_health_readiness_and_metrics_move_after_a_tick(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    port = free_port()
    path = make_config(health={"host": "127.0.0.1", "port": port})
    async with new_app(path, aws) as app:
        cycles = Cycles(app)
        base = f"http://127.0.0.1:{port}"
        assert (await get(f"{base}/readyz"))[0] == 200
        daemon = asyncio.create_task(app.run_forever())
        await cycles.wait(1, 20)  # the catch-up cycle for the minute it started in
        status, body = await get(f"{base}/healthz")
        assert status == 200 and json.loads(body)["healthy"]
        status, text = await get(f"{base}/metrics")
        assert status == 200
        assert metric(text, 'finnstream_quotes_total{outcome="ok"}') == 3
        assert metric(text, 'finnstream_records_delivered_total{source="quote"}') == 3
        assert metric(text, "finnstream_put_records_calls_total") == 1
        assert metric(text, "finnstream_cycle_seconds_count") == 1
        assert metric(text, "finnstream_last_cycle_timestamp_seconds") == cycles.reports[0].minute
        app.request_stop()
        assert await asyncio.wait_for(daemon, 10) == 0


async def test_the_daemon_fires_at_each_minute_and_polls_every_symbol_once(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    symbols = ["AAPL", "MSFT", "AMZN", "BRK.B", "^GSPC"]
    await early_in_a_minute()  # the real scheduler on the real clock
    async with new_app(make_config(symbols), aws, ShiftedClock(0.0)) as app:
        cycles = Cycles(app)
        daemon = asyncio.create_task(app.run_forever())
        await cycles.wait(2, 75)  # the catch-up cycle, then the first real tick
        app.request_stop()
        assert await asyncio.wait_for(daemon, 10) == 0
    tick = cycles.reports[1]
    assert tick.on_time and tick.delivered == len(symbols)
    to_wall = time.time() - time.monotonic()
    first = min(a for a in sim.stats.arrivals if a + to_wall >= tick.minute)
    assert first + to_wall - tick.minute < 0.25  # the first request within 250 ms of the minute
    landed = keys(aws.records())
    assert set(landed.values()) == {1}
    assert {(s, m) for s, m, _ in landed} == {
        (s, r.minute) for r in cycles.reports for s in symbols
    }


def token_reasons(app: App) -> list[str]:
    _, body = app.health.check(time.monotonic())
    reasons: list[str] = body["reasons"]
    return [r for r in reasons if "token" in r]


async def test_a_rotated_secret_is_read_again_and_a_dead_token_turns_health_red(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    clock = current_wall()
    async with new_app(make_config(["AAPL"]), aws, clock) as app:
        assert await app.run_once() == 0
        sim.settings.tokens = frozenset({"rotated-token-1"})
        aws.put_secret(json.dumps({"token": "rotated-token-1"}))
        clock.offset += 60
        with capture_logs() as logs:
            assert await app.run_once() == 0
        assert "finnhub.token_rotated" in [e["event"] for e in logs]
        assert not token_reasons(app)
        sim.settings.tokens = frozenset({"rotated-token-2"})  # rotated again, secret not updated
        clock.offset += 60
        await app.run_once()
        assert token_reasons(app) == ["Finnhub rejects the token: put a valid one in the secret"]
    assert len(aws.records()) == 2
    assert sim.stats.token_in_url == 0


async def test_tail_prints_the_stream_as_json_lines(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    path = make_config(["AAPL", "MSFT", "BRK.B"])
    async with new_app(path, aws) as app:
        assert await app.run_once() == 0
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "finnstream",
        "tail",
        "--config",
        str(path),
        "--from-start",
        "--limit",
        "3",
        env=subprocess_env(AWS_ENDPOINT_URL=aws.url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert sorted(r["symbol"] for r in lines) == ["AAPL", "BRK.B", "MSFT"]
    assert all(r["schema"] == 1 and r["source"] == "quote" for r in lines)


async def test_demo_shows_records_landing_within_15_seconds() -> None:
    await early_in_a_minute()  # the demo's first cycle is for the real minute under way
    env = subprocess_env()
    env.pop("AWS_ENDPOINT_URL", None)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "finnstream",
        "demo",
        "--cycles",
        "1",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 15
    text = out.decode()
    records = [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
    assert len(records) == 7 and {r["source"] for r in records} == {"quote"}
    assert "cycle " in text and "7 delivered" in text
    assert TOKEN not in text and "Traceback" not in text + err.decode()
