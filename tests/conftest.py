"""Shared fixtures: moto's server over real HTTP (Kinesis, Secrets Manager), the simulator,
config files, and readers that check what really landed in the stream."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import stamina
import yaml
from moto.kinesis.models import Shard
from moto.server import ThreadedMotoServer

from finnstream.clock import SystemClock
from finnstream.finnhub import TOKEN_CHECK_SYMBOL
from finnstream.ledger import GapLedger
from finnstream.simulator import Simulator, SimulatorSettings

TOKEN = "test-token-7f3a9c"  # distinctive, so a leak is easy to grep for
REGION = "us-east-1"

os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }
)
for _var in ("AWS_PROFILE", "FINNHUB_TOKEN", "FINNSTREAM_CONFIG"):
    os.environ.pop(_var, None)


@pytest.fixture(autouse=True)
def _no_retry_waits() -> Iterator[None]:
    """Retries keep their real attempt counts; only the waiting between them is turned off."""
    with stamina.set_testing(True, attempts=1000, cap=True):
        yield


def _serialize_shard_writes() -> None:
    """moto's Shard.put_record numbers a record max+1 and stores it under that number, with no
    lock, while its server answers on many threads: two PutRecords at once can give two records
    one number, and one of them vanishes. Kinesis does not do that, so the tests' moto must not."""
    original = Shard.put_record
    lock = threading.Lock()

    def put_record(self: Shard, *args: Any, **kwargs: Any) -> str:
        with lock:
            return original(self, *args, **kwargs)

    Shard.put_record = put_record  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    _serialize_shard_writes()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class Aws:
    """A fresh stream and secret per test on the shared moto server."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.kinesis = boto3.client("kinesis", endpoint_url=url, region_name=REGION)
        self.secrets = boto3.client("secretsmanager", endpoint_url=url, region_name=REGION)
        suffix = uuid.uuid4().hex[:8]
        self.stream = f"quotes-{suffix}"
        self.secret_id = f"finnstream/test-{suffix}"

    def create_stream(self, shards: int = 1) -> None:
        self.kinesis.create_stream(StreamName=self.stream, ShardCount=shards)

    def create_secret(self, value: str | None = None) -> None:
        self.secrets.create_secret(
            Name=self.secret_id,
            SecretString=value if value is not None else json.dumps({"token": TOKEN}),
        )

    def put_secret(self, value: str) -> None:
        self.secrets.put_secret_value(SecretId=self.secret_id, SecretString=value)

    def records(self) -> list[dict[str, Any]]:
        """Every record in the stream, decoded, checking the wire format on the way."""
        out = []
        shards = self.kinesis.list_shards(StreamName=self.stream)["Shards"]
        for shard in shards:
            it = self.kinesis.get_shard_iterator(
                StreamName=self.stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
            while it:
                page = self.kinesis.get_records(ShardIterator=it, Limit=10000)
                for rec in page["Records"]:
                    data = rec["Data"]
                    assert data.endswith(b"\n") and data.count(b"\n") == 1, data
                    body = json.loads(data)
                    assert rec["PartitionKey"] == body["symbol"]
                    out.append(body)
                if not page["Records"]:
                    break
                it = page.get("NextShardIterator")
        return out


@pytest.fixture
def aws(moto_url: str) -> Aws:
    a = Aws(moto_url)
    a.create_stream()
    a.create_secret()
    return a


@pytest.fixture
async def sim(wall: ShiftedClock) -> AsyncIterator[Simulator]:
    """The Finnhub simulator, on the test's wall clock (prices follow the app's minutes)."""
    async with Simulator(SimulatorSettings(tokens=frozenset({TOKEN})), clock=wall.time) as s:
        yield s


ConfigFactory = Callable[..., Path]


@pytest.fixture
def make_config(tmp_path: Path, aws: Aws, sim: Simulator) -> ConfigFactory:
    """Write a config pointing at the test's stand-ins; keyword sections override defaults."""

    def make(symbols: list[str] | None = None, **sections: dict[str, Any]) -> Path:
        doc: dict[str, Any] = {
            "symbols": symbols or ["AAPL", "MSFT", "AMZN"],
            "finnhub": {
                "base_url": sim.url,
                "token_secret_id": aws.secret_id,
                "timeout_s": 2,
                "requests_per_minute": 6000,
                "requests_per_second": 1000,
            },
            "kinesis": {"stream_name": aws.stream, "endpoint_url": aws.url, "region": REGION},
            "spool": {"dir": str(tmp_path / "spool")},
            "health": {"port": 0},
            "log": {"level": "DEBUG", "format": "json"},
        }
        for section, values in sections.items():
            doc.setdefault(section, {}).update(values)
        path = tmp_path / "finnstream.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return make


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINNSTREAM_", "FINNHUB_"))}
    env.update(extra)
    return env


def aligned_offset(second: float = 1.0) -> float:
    """An offset that puts the wall clock at `second` of the next minute, now."""
    now = time.time()
    return 60.0 - now % 60.0 + second


class ShiftedClock:
    """The real clock, with wall time moved by `offset` seconds (a later minute, on demand).
    Without an offset, it starts at second 1 of a minute: a quote's minute never runs out
    because a test happened to start at second 59."""

    def __init__(self, offset: float | None = None) -> None:
        self._real = SystemClock()
        self.offset = aligned_offset() if offset is None else offset

    def time(self) -> float:
        return self._real.time() + self.offset

    def monotonic(self) -> float:
        return self._real.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self._real.sleep(seconds)


_WALL: list[ShiftedClock] = []


@pytest.fixture(autouse=True)
def wall() -> Iterator[ShiftedClock]:
    """The test's wall clock: the simulator's and, unless a test passes its own, the apps'."""
    clock = ShiftedClock()
    _WALL.append(clock)
    yield clock
    _WALL.remove(clock)


def current_wall() -> ShiftedClock:
    return _WALL[-1]


async def early_in_a_minute(latest_second: float = 45.0) -> None:
    """For tests of real processes on the real clock: wait, if need be, until the minute has
    room for a whole cycle (a quote never starts after second 58 of its minute)."""
    second = time.time() % 60.0
    if second > latest_second:
        await asyncio.sleep(60.0 - second + 0.5)


def quotes_served(sim: Simulator) -> list[tuple[str, int, Any]]:
    """The quotes the simulator answered for configured symbols (not the start-up token check,
    which asks for a symbol nobody configures)."""
    return [q for q in sim.stats.served if q[0] != TOKEN_CHECK_SYMBOL]


def open_slots(spool_dir: Path) -> set[tuple[str, int]]:
    """Every slot a spool directory's ledger holds, windows expanded (every-minute cron)."""
    with GapLedger(spool_dir) as ledger:
        slots = {(g.symbol, g.minute) for g in ledger.open_gaps()}
        for w in ledger.windows():
            slots |= {(w.symbol, m) for m in range(w.first, w.last + 60, 60)}
    return slots


def wait_for_room_in_the_minute(latest_second: float = 45.0) -> None:
    """`early_in_a_minute` for synchronous tests of real processes (containers)."""
    second = time.time() % 60.0
    if second > latest_second:
        time.sleep(60.0 - second + 0.5)


def app_env(aws: Aws) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": aws.url}
