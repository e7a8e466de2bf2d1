"""`finnstream tail`: read records back from every shard and print them as JSON lines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import Any, TextIO

import structlog
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError

from finnstream.config import Config, aws_endpoint, aws_region
from finnstream.errors import StreamMissing

log = structlog.get_logger("finnstream.tail")

POLL_S = 1.0  # GetRecords allows 5 calls per second per shard


async def _shard_ids(client: Any, stream: str) -> list[str]:
    ids: list[str] = []
    kwargs: dict[str, Any] = {"StreamName": stream}
    while True:
        page = await client.list_shards(**kwargs)
        ids += [s["ShardId"] for s in page.get("Shards", [])]
        token = page.get("NextToken")
        if not token:
            return ids
        kwargs = {"NextToken": token}


async def tail(
    cfg: Config,
    *,
    from_start: bool,
    limit: int | None,
    stop: asyncio.Event,
    out: TextIO | None = None,
    session: AioSession | None = None,
) -> int:
    """Print records until `limit` are printed or `stop` is set. Exit code per the contract."""
    out = out or sys.stdout
    stream = cfg.kinesis.stream_name
    session = session or AioSession()
    printed = 0
    async with session.create_client(
        "kinesis",
        region_name=aws_region(cfg, os.environ),
        endpoint_url=aws_endpoint(cfg, "kinesis", os.environ),
    ) as client:
        try:
            shard_ids = await _shard_ids(client, stream)
            iterators: dict[str, str | None] = {}
            for shard in shard_ids:
                answer = await client.get_shard_iterator(
                    StreamName=stream,
                    ShardId=shard,
                    ShardIteratorType="TRIM_HORIZON" if from_start else "LATEST",
                )
                iterators[shard] = answer["ShardIterator"]
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "Unknown")
            raise StreamMissing(
                f"cannot read Kinesis stream {stream}: AWS answered {code}"
            ) from None
        except BotoCoreError as exc:
            raise StreamMissing(f"cannot reach Kinesis to read stream {stream}: {exc}") from None
        while not stop.is_set() and any(iterators.values()):
            idle = True
            for shard, iterator in list(iterators.items()):
                if iterator is None:
                    continue
                try:
                    answer = await client.get_records(ShardIterator=iterator, Limit=1000)
                except ClientError as exc:
                    log.warning(
                        "tail.get_records_failed",
                        shard=shard,
                        error=exc.response.get("Error", {}).get("Code"),
                    )
                    continue
                iterators[shard] = answer.get("NextShardIterator")
                for rec in answer.get("Records", []):
                    out.write(rec["Data"].decode("utf-8", "replace").rstrip("\n") + "\n")
                    printed += 1
                    idle = False
                    if limit is not None and printed >= limit:
                        out.flush()
                        return 0
            out.flush()
            if idle:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_S)
    return 0
