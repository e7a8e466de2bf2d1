"""Real faults for tests: moto's Kinesis backend patched in-process, and a TCP proxy that can
refuse connections. Both are seeded, so a failing run can be replayed."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from moto.core.exceptions import JsonRESTError
from moto.kinesis.models import KinesisBackend


class InternalFailure(JsonRESTError):
    code = 500

    def __init__(self) -> None:
        super().__init__("InternalFailure", "injected whole-call failure")


class Throttled(JsonRESTError):
    code = 400

    def __init__(self) -> None:
        super().__init__("ProvisionedThroughputExceededException", "injected whole-call throttle")


@dataclass
class KinesisFaults:
    """Per-record throttling, whole-call failures and full outages for PutRecords."""

    record_throttle: float = 0.0  # share of records answered ProvisionedThroughputExceededException
    record_internal: float = 0.0  # share of records answered InternalFailure
    call_failure: float = 0.0  # share of calls failing whole (alternating 500 and throttle)
    outage: bool = False  # every call fails with 500
    seed: int = 7
    calls: list[int] = field(default_factory=list)  # records per call, as received
    accepted: int = 0
    _rng: random.Random = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def put_records(
        self, original: Any, backend: Any, arn: str, name: str, records: list[dict[str, Any]]
    ) -> dict[str, Any]:
        with self._lock:
            self.calls.append(len(records))
            if self.outage:
                raise InternalFailure()
            roll = self._rng.random()
            if roll < self.call_failure:
                raise InternalFailure() if roll < self.call_failure / 2 else Throttled()
            codes = []
            for _ in records:
                r = self._rng.random()
                if r < self.record_throttle:
                    codes.append("ProvisionedThroughputExceededException")
                elif r < self.record_throttle + self.record_internal:
                    codes.append("InternalFailure")
                else:
                    codes.append(None)
        kept = [rec for rec, code in zip(records, codes, strict=True) if code is None]
        answer = original(backend, arn, name, kept) if kept else {"Records": []}
        accepted = iter(answer["Records"])
        entries = []
        for code in codes:
            if code is None:
                entries.append(next(accepted))
            else:
                entries.append({"ErrorCode": code, "ErrorMessage": "injected"})
        with self._lock:
            self.accepted += len(kept)
        return {"FailedRecordCount": sum(c is not None for c in codes), "Records": entries}


@contextlib.contextmanager
def patched_kinesis(faults: KinesisFaults) -> Iterator[KinesisFaults]:
    original = KinesisBackend.put_records

    def put_records(
        self: Any, stream_arn: str, stream_name: str, records: list[dict[str, Any]]
    ) -> Any:
        return faults.put_records(original, self, stream_arn, stream_name, records)

    KinesisBackend.put_records = put_records  # type: ignore[method-assign]
    try:
        yield faults
    finally:
        KinesisBackend.put_records = original  # type: ignore[method-assign]


class RefusingProxy:
    """A TCP proxy on loopback; while `refusing`, every new connection is reset at once and
    open ones are cut."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self.refusing = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.refused = 0

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aenter__(self) -> RefusingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    def refuse(self, on: bool = True) -> None:
        self.refusing = on
        if on:
            self.cut()

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update({writer, up_writer})
