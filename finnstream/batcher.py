"""Pure batching for PutRecords: no I/O, no clock of its own, tested without AWS.

A batch closes on count (500), on bytes (5 MiB including partition keys) or, in the
`Accumulator`, on linger. Picking the failed entries of a PutRecords answer is a pure function too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finnstream.records import Record

MAX_RECORDS_PER_PUT = 500
MAX_BYTES_PER_PUT = 5 * 1024 * 1024
MAX_BYTES_PER_RECORD = 1024 * 1024  # data plus partition key
MAX_PARTITION_KEY_LEN = 256
LINGER_S = 1.0  # a batch waits at most this long for more records


class RecordTooLarge(ValueError):
    """A record Kinesis would refuse outright (over 1 MiB, or a bad partition key)."""


def record_size(record: Record) -> int:
    return len(record.data) + len(record.partition_key.encode())


def check_record(record: Record) -> None:
    key_len = len(record.partition_key)
    if not 1 <= key_len <= MAX_PARTITION_KEY_LEN:
        raise RecordTooLarge(f"partition key of {key_len} characters (Kinesis allows 1 to 256)")
    if record_size(record) > MAX_BYTES_PER_RECORD:
        raise RecordTooLarge(f"record of {record_size(record)} bytes (Kinesis allows 1 MiB)")


@dataclass
class Batch:
    records: list[Record] = field(default_factory=list)
    size: int = 0
    opened_at: float = 0.0

    def __len__(self) -> int:
        return len(self.records)

    def fits(self, record: Record) -> bool:
        return (
            len(self.records) < MAX_RECORDS_PER_PUT
            and self.size + record_size(record) <= MAX_BYTES_PER_PUT
        )

    def append(self, record: Record) -> None:
        self.records.append(record)
        self.size += record_size(record)


class Accumulator:
    """Collects records into batches; `add` returns a batch as soon as one is full."""

    def __init__(self, linger_s: float = LINGER_S) -> None:
        self.linger_s = linger_s
        self._open: Batch | None = None

    def add(self, record: Record, now: float) -> Batch | None:
        """Add `record` (checked with `check_record`); returns the batch it closed, if any."""
        check_record(record)
        closed = self.drain() if self._open is not None and not self._open.fits(record) else None
        if self._open is None:
            self._open = Batch(opened_at=now)
        self._open.append(record)
        if closed is None and len(self._open) == MAX_RECORDS_PER_PUT:
            closed = self.drain()
        return closed

    def due(self, now: float) -> Batch | None:
        """The open batch, if it has lingered long enough."""
        if self._open is not None and now - self._open.opened_at >= self.linger_s:
            return self.drain()
        return None

    def drain(self) -> Batch | None:
        batch, self._open = self._open, None
        return batch

    def __len__(self) -> int:
        return 0 if self._open is None else len(self._open)


def split_batches(records: Iterable[Record]) -> list[Batch]:
    """All of `records` in as few PutRecords-sized batches as order allows."""
    acc = Accumulator()
    batches = [b for r in records if (b := acc.add(r, 0.0)) is not None]
    last = acc.drain()
    return batches + ([last] if last is not None else [])


def pick_failed(
    sent: Sequence[Record], answer: Mapping[str, Any]
) -> tuple[list[Record], Counter[str]]:
    """The records a PutRecords answer did not accept, and a count of its error codes.

    Entries match the request by position. An answer whose length does not match cannot be
    trusted, so every record counts as failed (retrying may duplicate, never lose).
    """
    entries = answer.get("Records")
    if not isinstance(entries, list) or len(entries) != len(sent):
        return list(sent), Counter({"MalformedAnswer": len(sent)})
    failed: list[Record] = []
    codes: Counter[str] = Counter()
    for record, entry in zip(sent, entries, strict=True):
        code = entry.get("ErrorCode") if isinstance(entry, dict) else "MalformedEntry"
        if code or not (isinstance(entry, dict) and entry.get("SequenceNumber")):
            failed.append(record)
            codes[str(code or "NoSequenceNumber")] += 1
    return failed, codes
