"""The Kinesis sender: one long-lived aiobotocore client, concurrent PutRecords, partial retries.

Whole-call failures (5xx, throttling, timeouts, connection resets) and per-record failures
(`ProvisionedThroughputExceededException`, `InternalFailure`) are separate paths that share one
declared retry policy (stamina: attempts `kinesis.max_retries`, jittered exponential backoff).
Only entries the answer marks failed are resent, so the retry logic never resends an accepted
record. What is still undelivered is handed back to the caller, which spools it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import stamina
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError

from finnstream.batcher import Accumulator, Batch, RecordTooLarge, pick_failed, split_batches
from finnstream.clock import SYSTEM_CLOCK, Clock
from finnstream.config import KinesisConfig
from finnstream.errors import KinesisError, StreamMissing
from finnstream.metrics import Metrics
from finnstream.records import Record

log = structlog.get_logger("finnstream.kinesis")

MAX_CONCURRENT_PUTS = 8
RETRY_WAIT_INITIAL_S = 0.1
RETRY_WAIT_MAX_S = 5.0
RETRIABLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "LimitExceededException",
        "InternalFailure",
        "InternalFailureException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "KMSThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
    }
)


class PartialFailure(KinesisError):
    def __init__(self, failed: int) -> None:
        super().__init__(f"{failed} records not accepted", retriable=True)


def _retriable(exc: Exception) -> bool:
    return isinstance(exc, KinesisError) and exc.retriable


def classify_client_error(exc: ClientError) -> KinesisError:
    code = exc.response.get("Error", {}).get("Code", "Unknown")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
    return KinesisError(
        f"PutRecords failed: {code}", retriable=code in RETRIABLE_CODES or status >= 500
    )


class KinesisSink:
    def __init__(
        self,
        cfg: KinesisConfig,
        session: AioSession,
        metrics: Metrics,
        *,
        clock: Clock = SYSTEM_CLOCK,
        client: Any = None,
    ) -> None:
        self._cfg = cfg
        self._session = session
        self._metrics = metrics
        self._clock = clock
        self._stack = contextlib.AsyncExitStack()
        self._given_client = client  # an open Kinesis client (the simulation's); else one is made
        self._client: Any = None
        self._puts = asyncio.Semaphore(MAX_CONCURRENT_PUTS)
        self.stream_arn: str | None = None

    async def start(self) -> None:
        """Open the client and check that the stream exists (StreamMissing: exit 3)."""
        config = AioConfig(
            retries={"total_max_attempts": 1},  # one place decides retry: `_put_batch`
            connect_timeout=5,
            read_timeout=15,
            max_pool_connections=MAX_CONCURRENT_PUTS * 2,
        )
        self._client = self._given_client or await self._stack.enter_async_context(
            self._session.create_client(
                "kinesis",
                region_name=self._cfg.region,
                endpoint_url=self._cfg.endpoint_url,
                config=config,
            )
        )
        try:
            summary = await self._client.describe_stream_summary(StreamName=self._cfg.stream_name)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "Unknown")
            await self.close()
            if code == "ResourceNotFoundException":
                raise StreamMissing(
                    f"Kinesis stream {self._cfg.stream_name} does not exist in this "
                    "account and region: create it or set kinesis.stream_name"
                ) from None
            raise StreamMissing(
                f"cannot describe Kinesis stream {self._cfg.stream_name}: AWS answered "
                f"{code} (the task role needs kinesis:DescribeStreamSummary)"
            ) from None
        except BotoCoreError as exc:
            await self.close()
            raise StreamMissing(
                f"cannot reach Kinesis to check stream {self._cfg.stream_name}: {exc}"
            ) from None
        desc = summary["StreamDescriptionSummary"]
        self.stream_arn = desc.get("StreamARN")
        log.info(
            "kinesis.ready",
            stream=self._cfg.stream_name,
            status=desc.get("StreamStatus"),
            shards=desc.get("OpenShardCount"),
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    async def put(self, records: Sequence[Record], deadline: float | None = None) -> list[Record]:
        """Deliver `records` (any number); returns those still undelivered."""
        batches = split_batches(records)
        results = await asyncio.gather(*(self.put_batch(b.records, deadline) for b in batches))
        return [r for undelivered in results for r in undelivered]

    async def put_batch(self, records: list[Record], deadline: float | None = None) -> list[Record]:
        """One batch (at most 500 records, 5 MiB), retried until `deadline` (monotonic, on the
        injected clock) or `kinesis.max_retries`; returns what was never accepted."""
        remaining = records

        def retry(exc: Exception) -> bool | float:
            """Retry a retriable failure while time is left; never wait past the deadline."""
            if not _retriable(exc):
                return False
            if deadline is None:
                return True
            left = deadline - self._clock.monotonic()
            if left <= 0:
                return False
            return True if left >= RETRY_WAIT_MAX_S else left / 2

        try:
            async for attempt in stamina.retry_context(
                on=retry,
                attempts=self._cfg.max_retries + 1,
                wait_initial=RETRY_WAIT_INITIAL_S,
                wait_max=RETRY_WAIT_MAX_S,
            ):
                with attempt:
                    remaining = await self._put_once(remaining)
                    if remaining:
                        raise PartialFailure(len(remaining))
        except KinesisError as exc:
            log.warning("kinesis.undelivered", records=len(remaining), error=str(exc))
        return remaining

    async def _put_once(self, records: list[Record]) -> list[Record]:
        entries = [{"Data": r.data, "PartitionKey": r.partition_key} for r in records]
        async with self._puts:
            try:
                answer = await self._client.put_records(
                    StreamName=self._cfg.stream_name, Records=entries
                )
            except ClientError as exc:
                self._metrics.put_calls.labels(result="error").inc()
                raise classify_client_error(exc) from None
            except (BotoCoreError, OSError, TimeoutError) as exc:
                self._metrics.put_calls.labels(result="error").inc()
                raise KinesisError(
                    f"PutRecords failed: {type(exc).__name__}", retriable=True
                ) from None
        failed, codes = pick_failed(records, answer)
        self._metrics.put_calls.labels(result="partial" if failed else "ok").inc()
        failed_ids = {id(r) for r in failed}
        delivered = Counter(r.source for r in records if id(r) not in failed_ids)
        for source, n in delivered.items():
            self._metrics.records_delivered.labels(source=source).inc(n)
        # Counted where they land, so a record that went through the spool counts too.
        self._metrics.candles.inc(delivered["candle"])
        self._metrics.gaps_published.inc(delivered["gap"])
        for code, n in codes.items():
            self._metrics.records_retried.labels(error=code).inc(n)
        if failed:
            log.debug(
                "kinesis.partial_failure", failed=len(failed), sent=len(records), codes=dict(codes)
            )
        return failed


class Publisher:
    """Streams records into batches as they arrive and sends each batch as soon as it closes.

    `add` never blocks; `close` flushes, waits for every send and returns what is undelivered.
    """

    def __init__(
        self,
        sink: KinesisSink,
        clock: Clock = SYSTEM_CLOCK,
        deadline: float | None = None,
        linger_s: float | None = None,
    ) -> None:
        self._sink = sink
        self._clock = clock
        self._deadline = deadline
        self._acc = Accumulator() if linger_s is None else Accumulator(linger_s)
        self._sends: dict[asyncio.Task[None], None] = {}  # ordered: deterministic under test
        self._undelivered: list[Record] = []
        self._lingerer: asyncio.Task[None] | None = None

    def add(self, record: Record) -> str | None:
        """Queue `record`; returns why Kinesis would refuse it outright (the caller ledgers its
        slot), or None."""
        try:
            batch = self._acc.add(record, self._clock.monotonic())
        except RecordTooLarge as exc:
            log.error(
                "kinesis.record_refused", symbol=record.symbol, minute=record.minute, error=str(exc)
            )
            return f"Kinesis would refuse the record: {exc}"
        if batch is not None:
            self._send(batch)
        if self._lingerer is None and len(self._acc):
            self._lingerer = asyncio.create_task(self._linger(), name="publisher-linger")
        return None

    def _send(self, batch: Batch) -> None:
        task = asyncio.create_task(self._guarded(batch.records), name="put-records")
        self._sends[task] = None
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._sends.pop(task, None)

    async def _guarded(self, records: list[Record]) -> None:
        """Send one batch; whatever happens, its undelivered records end up in `_undelivered`."""
        try:
            self._undelivered.extend(await self._sink.put_batch(records, self._deadline))
        except asyncio.CancelledError:
            self._undelivered.extend(records)  # may duplicate on the next delivery, never lose
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in a send must not lose its records
            log.error("kinesis.sender_crashed", error=repr(exc), records=len(records))
            self._undelivered.extend(records)

    async def _linger(self) -> None:
        try:
            while len(self._acc):
                await self._clock.sleep(self._acc.linger_s / 4)
                if (batch := self._acc.due(self._clock.monotonic())) is not None:
                    self._send(batch)
        finally:
            self._lingerer = None

    async def close(self) -> list[Record]:
        """Flush the open batch, wait for every send; returns the undelivered records."""
        if self._lingerer is not None:
            self._lingerer.cancel()
            # Not `suppress(CancelledError)`: that would also swallow a cancel of close() itself
            # (the cycle's publish deadline), and close would go on waiting for every send.
            await asyncio.gather(self._lingerer, return_exceptions=True)
        if (batch := self._acc.drain()) is not None:
            self._send(batch)
        await asyncio.gather(*list(self._sends), return_exceptions=True)
        return self._undelivered

    async def abort(self) -> list[Record]:
        """Stop sending now; the open and in-flight batches count as undelivered (they may have
        landed: delivery is at-least-once), so the caller spools them."""
        if self._lingerer is not None:
            self._lingerer.cancel()
        if (batch := self._acc.drain()) is not None:
            self._undelivered.extend(batch.records)
        for task in list(self._sends):
            task.cancel()
        await asyncio.gather(*list(self._sends), return_exceptions=True)
        return self._undelivered
