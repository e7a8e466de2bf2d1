"""In-process Finnhub and Kinesis for the simulation: Finnhub's answers, limits and 429s, and
Kinesis's PutRecords contract, with the plan's faults switched on and off by virtual time.

They keep what a checker needs: every quote served (symbol, when it was asked, when it was
answered, the body) and every record Kinesis accepted.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
from botocore.exceptions import ClientError, EndpointConnectionError

from finnstream.batcher import MAX_BYTES_PER_PUT, MAX_BYTES_PER_RECORD, MAX_RECORDS_PER_PUT
from finnstream.clock import minute_slot
from finnstream.errors import FinnhubError
from finnstream.simulator import UNKNOWN_QUOTE, candle_for, quote_for
from finnstream.transport import Answer

from .plan import UNKNOWN_SYMBOL, Plan
from .vloop import VirtualClock

TOKEN = "sim-token-0123456789abcdef"
GARBAGE: tuple[bytes, ...] = (
    b"<html>502 Bad Gateway</html>",
    b"[1, 2, 3]",
    b'{"c": "351.2", "t": 1}',
    b'{"c": -4.5, "d": 0.1, "t": 1700000000}',  # not a price
    b'{"c": 0, "d": null, "t": 1700000000}',  # not a price (t is set)
    b'{"c": 10.5, "t": 100000000000000000000}',  # t beyond any integer orjson writes
    b'{"o": 1.0, "t": 1}',  # no price
)


@dataclass(frozen=True)
class Served:
    symbol: str
    asked: float  # wall time the request reached "Finnhub"
    answered: float  # wall time the answer left
    body: dict[str, Any]


@dataclass
class FakeFinnhub:
    """A `Transport` (see finnstream/transport.py) that is Finnhub, on virtual time."""

    plan: Plan
    clock: VirtualClock
    rng: random.Random
    served: list[Served] = field(default_factory=list)
    candle_requests: list[tuple[str, int, int]] = field(default_factory=list)  # symbol, from, to
    requests: int = 0
    paced_429: int = 0  # 429s one process's own pace caused (must stay 0)
    process: int = 0  # which process is asking (a new one knows nothing of its predecessor's pace)
    _starts: deque[tuple[float, int]] = field(default_factory=deque)

    async def __call__(
        self, url: str, params: Mapping[str, str], headers: Mapping[str, str], timeout_s: float
    ) -> Answer:
        self.requests += 1
        t = self.clock.now
        asked = self.clock.time()
        if urlsplit(url).path.endswith("/stock/candle"):  # a try, whatever comes back
            self.candle_requests.append((params["symbol"], int(params["from"]), int(params["to"])))
        assert "token" not in url.lower() and all("token" not in k.lower() for k in params)
        if self.plan.level("finnhub_down", t):
            raise FinnhubError("GET: ClientConnectorError", retriable=True)
        latency = self.plan.level("finnhub_slow", t) or 0.01
        if latency > timeout_s:
            await asyncio.sleep(timeout_s)
            raise TimeoutError
        if (paced := self._pace(asked)) is not None:
            return paced
        await asyncio.sleep(latency)
        if headers.get("X-Finnhub-Token") != TOKEN:
            return Answer(401, b'{"error":"Invalid API key"}')
        if (share := self.plan.level("finnhub_5xx", t)) and self.rng.random() < share:
            return Answer(self.rng.choice([500, 502, 503]), b'{"error":"server error"}')
        if (share := self.plan.level("finnhub_429", t)) and self.rng.random() < share:
            return Answer(429, b'{"error":"API limit reached."}', retry_after="1")
        path = urlsplit(url).path
        if path.endswith("/quote"):
            return self._quote(params["symbol"], asked, t)
        if path.endswith("/stock/candle"):
            return self._candles(params, t)
        return Answer(404, b'{"error":"not found"}')

    def _pace(self, asked: float) -> Answer | None:
        """Finnhub's own limits: requests per second and per minute, answered 429 when over.
        A 429 that this process's own requests alone would have drawn is counted: a restart
        may run into its predecessor's requests, which no process can see."""
        while self._starts and self._starts[0][0] <= asked - 60.0:
            self._starts.popleft()
        if self._over(self._starts, asked):
            if self._over([s for s in self._starts if s[1] == self.process], asked):
                self.paced_429 += 1
            return Answer(429, b'{"error":"API limit reached."}', retry_after="1")
        self._starts.append((asked, self.process))
        return None

    def _over(self, starts: Iterable[tuple[float, int]], asked: float) -> bool:
        window = list(starts)
        last_second = sum(1 for t, _ in window if t > asked - 1.0)
        return (
            len(window) >= self.plan.requests_per_minute
            or last_second >= self.plan.requests_per_second
        )

    def _quote(self, symbol: str, asked: float, t: float) -> Answer:
        if (share := self.plan.level("finnhub_garbage", t)) and self.rng.random() < share:
            return Answer(200, self.rng.choice(GARBAGE))
        minute = minute_slot(self.clock.time())
        body = dict(UNKNOWN_QUOTE) if symbol == UNKNOWN_SYMBOL else quote_for(symbol, minute)
        self.served.append(Served(symbol, asked, self.clock.time(), body))
        return Answer(200, orjson.dumps(body))

    def _candles(self, params: Mapping[str, str], t: float) -> Answer:
        if self.plan.candles == "free":
            return Answer(403, b'{"error":"You don\'t have access to this resource."}')
        if (share := self.plan.level("finnhub_garbage", t)) and self.rng.random() < share:
            return Answer(200, b'{"s":"ok","t":[1,2],"c":[1.0]}')
        symbol, first, last = params["symbol"], int(params["from"]), int(params["to"])
        bars = [
            candle_for(symbol, m)
            for m in range(minute_slot(first), last + 1, 60)
            if symbol != UNKNOWN_SYMBOL and self._has_bar(symbol, m)
        ]
        if not bars:
            return Answer(200, b'{"s":"no_data"}')
        columns = {k: [b[k] for b in bars] for k in ("t", "o", "h", "l", "c", "v")}
        return Answer(200, orjson.dumps({"s": "ok", **columns}))

    def _has_bar(self, symbol: str, minute: int) -> bool:
        """About one minute in forty has no trade, so no bar: those slots end as gaps."""
        return random.Random(f"{symbol}/{minute}").random() >= 0.025


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": "injected"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutRecords",
    )


@dataclass
class FakeKinesis:
    """The slice of an aiobotocore Kinesis client finnstream uses, on virtual time."""

    plan: Plan
    clock: VirtualClock
    rng: random.Random
    accepted: list[dict[str, Any]] = field(default_factory=list)  # decoded records, in order
    calls: int = 0
    contract_violations: list[str] = field(default_factory=list)

    async def describe_stream_summary(self, StreamName: str) -> dict[str, Any]:
        if self.plan.level("kinesis_down", self.clock.now):
            raise EndpointConnectionError(endpoint_url="https://kinesis.us-east-1.amazonaws.com")
        return {
            "StreamDescriptionSummary": {
                "StreamARN": f"arn:aws:kinesis:us-east-1:000000000000:stream/{StreamName}",
                "StreamStatus": "ACTIVE",
                "OpenShardCount": 1,
            }
        }

    async def put_records(self, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls += 1
        self._check_contract(Records)
        t = self.clock.now
        await asyncio.sleep(self.plan.level("kinesis_slow", t) or 0.02)
        t = self.clock.now
        if self.plan.level("kinesis_down", t):
            raise EndpointConnectionError(endpoint_url="https://kinesis.us-east-1.amazonaws.com")
        if (share := self.plan.level("kinesis_errors", t)) and self.rng.random() < share:
            raise self.rng.choice(
                [
                    _client_error("InternalFailure", 500),
                    _client_error("ServiceUnavailable", 503),
                    _client_error("ProvisionedThroughputExceededException", 400),
                ]
            )
        throttle = self.plan.level("kinesis_throttle", t) or 0.0
        entries: list[dict[str, Any]] = []
        for rec in Records:
            if self.rng.random() < throttle:
                code = self.rng.choice(
                    ["ProvisionedThroughputExceededException", "InternalFailure"]
                )
                entries.append({"ErrorCode": code, "ErrorMessage": "injected"})
                continue
            self.accepted.append(orjson.loads(rec["Data"]))
            entries.append({"SequenceNumber": str(len(self.accepted)), "ShardId": "shardId-0"})
        if (share := self.plan.level("kinesis_lost_answers", t)) and self.rng.random() < share:
            raise TimeoutError  # accepted, but the answer never arrives: at-least-once
        failed = sum(1 for e in entries if "ErrorCode" in e)
        return {"FailedRecordCount": failed, "Records": entries}

    def _check_contract(self, records: list[dict[str, Any]]) -> None:
        if not 1 <= len(records) <= MAX_RECORDS_PER_PUT:
            self.contract_violations.append(f"{len(records)} records in one call")
        size = 0
        for rec in records:
            one = len(rec["Data"]) + len(rec["PartitionKey"].encode())
            size += one
            if one > MAX_BYTES_PER_RECORD or not 1 <= len(rec["PartitionKey"]) <= 256:
                self.contract_violations.append("a record over 1 MiB or a bad partition key")
            data = rec["Data"]
            if not data.endswith(b"\n") or orjson.loads(data)["symbol"] != rec["PartitionKey"]:
                self.contract_violations.append("data not one JSON line keyed by its symbol")
        if size > MAX_BYTES_PER_PUT:
            self.contract_violations.append(f"{size} bytes in one call")
